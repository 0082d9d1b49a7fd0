"""The pipeline as data: every model the kit trains or evaluates and every notebook that runs them.

One name per stage. A *model stage* is named by its tag, and that one name is used for all of its
artifacts and everywhere a user sees it: ``checkpoints/<tag>/``, ``predictions/<tag>.jsonl``,
``pseudo_labels/<tag>.jsonl``, ``logs/<tag>.jsonl``, ``metrics.json`` ``models[<tag>]``, the
FiftyOne fields ``pred_<tag>``/``pl_<tag>`` and the report's tag column. Its other identifiers
are attributes of that stage, not further names: the paper's symbol (``1b``), its config key
under ``stages`` (``adapt_1b``), the step that produces it and the display label.

A *step* is one stage notebook and the stage function it calls; its name (``adapt_teacher``) is
the function's name, its ``metrics.json`` ``stages`` key and its ``sskd run --from/--only`` name.

=================  ======  =================  ==================  ================================
model (tag)        symbol  config (stages.)   step (notebook)     trains on
=================  ======  =================  ==================  ================================
teacher_zero_shot  T0      (teacher_pretrain) zero_shot (01)      - (the foundation teacher)
teacher_supervised T-sup   teacher_supervised adapt_teacher (02)  D_l, from T0
teacher_1a         1a      adapt_1a           adapt_teacher (02)  D_l + L_pxl, from T0
teacher_adapted    1b      adapt_1b           adapt_teacher (02)  D_l + 1a pseudo D_u, from T0
student_supervised S-sup   student_supervised transfer (03)       D_l, from the initial student
student_transfer   2       transfer           transfer (03)       D_l + teacher pseudo D_u
student_refined    3       refine             refine (04)         D_l, from student_transfer
=================  ======  =================  ==================  ================================

Everything that used to keep its own table of these (the runner's aliases and config
dependencies, ``sskd.rundir.MODEL_TAGS``, the report rows, plot labels, FiftyOne stage tags, the
widgets, the ablations' teacher keys) reads this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

TEACHER_INIT = "teacher_pretrain"  # theta_T0: the foundation teacher (a stand-in offline)
STUDENT_INIT = "student_init"      # the initial student (random / student.weights / stand-in)


@dataclass(frozen=True)
class Model:
    """One model stage; ``tag`` is its only name (see the module docstring)."""

    tag: str
    symbol: str                       # paper symbol / stage number
    label: str                        # display label (Table 1 row, plots, widgets)
    role: str                         # "teacher" | "student"
    kind: str                         # "zero_shot" | "stage" (the paper's stages) | "baseline"
    step: str                         # name of the step (notebook) that produces it
    config_key: str | None = None     # its StageConfig under ``cfg.stages`` (None: not trained)
    starts_from: str = ""             # TEACHER_INIT, STUDENT_INIT or another model's tag
    pseudo_labels: tuple[str, ...] = ()  # whose pseudo-labels it trains on, first produced wins
    requires: tuple[str, ...] = ()    # ``stages.<key>.enabled`` all true <=> the run has it
    writes_pseudo_labels: bool = False  # it pseudo-labels D_u (``pseudo_labels/<tag>.jsonl``)
    table1: bool = True               # a row of the results table (the paper's Table 1)

    @property
    def fiftyone_stage(self) -> str:
        """Its FiftyOne sample tag value (``stage:<this>``)."""
        return f"stage{self.symbol}" if self.kind == "stage" else self.kind


@dataclass(frozen=True)
class Standin:
    """A model pretrained by the kit (cached per machine, outside the run dir)."""

    name: str                         # its ``metrics.json`` ``stages`` key and config key
    role: str
    step: str                         # the step whose inputs it is
    label: str


@dataclass(frozen=True)
class Step:
    """One stage notebook and the stage function it calls."""

    name: str                         # stage function, metrics ``stages`` key, --from/--only name
    notebook: str                     # ``notebooks/<notebook>.ipynb``
    label: str
    aliases: tuple[str, ...] = ()     # other names accepted by ``sskd run --from/--only``
    # config keys only this step and later ones read (besides its models' ``stages.<key>``)
    config: tuple[str, ...] = ()
    # None: the step reads every config key not owned by a later step; else only these
    reads: tuple[str, ...] | None = None
    timed: bool = True                # records its wall time in ``metrics.json`` ``stages``


MODELS: tuple[Model, ...] = (
    Model("teacher_zero_shot", "T0", "zero-shot teacher", "teacher", "zero_shot", "zero_shot",
          starts_from=TEACHER_INIT, writes_pseudo_labels=True),
    Model("teacher_supervised", "T-sup", "teacher, supervised fine-tuning", "teacher", "baseline",
          "adapt_teacher", "teacher_supervised", TEACHER_INIT, requires=("teacher_supervised",)),
    Model("teacher_1a", "1a", "teacher after stage 1a", "teacher", "stage", "adapt_teacher",
          "adapt_1a", TEACHER_INIT, requires=("adapt_1a",), writes_pseudo_labels=True,
          table1=False),
    # with adapt_1b off the 1a teacher is "the adapted teacher" (evaluated under this tag)
    Model("teacher_adapted", "1b", "teacher, adapted (stage 1)", "teacher", "stage",
          "adapt_teacher", "adapt_1b", TEACHER_INIT, ("teacher_1a",), requires=("adapt_1a",),
          writes_pseudo_labels=True),
    Model("student_supervised", "S-sup", "student, supervised only", "student", "baseline",
          "transfer", "student_supervised", STUDENT_INIT, requires=("student_supervised",)),
    Model("student_transfer", "2", "student after stage 2", "student", "stage", "transfer",
          "transfer", STUDENT_INIT, ("teacher_adapted", "teacher_zero_shot"),
          requires=("transfer",)),
    Model("student_refined", "3", "student after stage 3", "student", "stage", "refine",
          "refine", "student_transfer", requires=("refine",)),
)

STANDINS: tuple[Standin, ...] = (
    Standin("teacher_pretrain", "teacher", "zero_shot",
            "stand-in teacher pretrained on the source domain"),
    Standin("student_pretrain", "student", "transfer",
            "stand-in student pretrained on the source domain"),
)

STEPS: tuple[Step, ...] = (
    Step("prepare_data", "00_data", "data: generate/read, split D_l / D_u / val", ("data",),
         reads=("data",), timed=False),
    Step("zero_shot", "01_zero_shot_teacher", "zero-shot teacher", ("zero_shot_teacher",),
         ("stages.teacher_pretrain",)),
    Step("adapt_teacher", "02_teacher_adaptation", "stage 1: teacher adaptation",
         ("teacher_adaptation",)),
    Step("transfer", "03_knowledge_transfer", "stage 2: knowledge transfer",
         ("knowledge_transfer",), ("stages.student_pretrain",)),
    # notebook 04 also exports the run to FiftyOne (``inspect``)
    Step("refine", "04_student_refinement", "stage 3: student refinement",
         ("student_refinement",), ("inspect",)),
    Step("report", "05_report", "ablations, efficiency, report", (),
         ("ablations", "evaluation.seed_noise_ap"), timed=False),
)

#: config keys that change how a run executes, not its results (never re-run a notebook)
EXECUTION_KEYS = ("run_name", "runs_root", "preset", "cache_dir", "workers", "device")

MODEL_TAGS: tuple[str, ...] = tuple(m.tag for m in MODELS)
_BY_TAG = {m.tag: m for m in MODELS}
_BY_STEP = {s.name: s for s in STEPS}


def model(tag: str) -> Model:
    if tag not in _BY_TAG:
        raise KeyError(f"unknown model tag {tag!r}; known: {list(MODEL_TAGS)}")
    return _BY_TAG[tag]


def step(name: str) -> Step:
    if name not in _BY_STEP:
        raise KeyError(f"unknown step {name!r}; known: {[s.name for s in STEPS]}")
    return _BY_STEP[name]


def models_of(step_name: str) -> tuple[Model, ...]:
    return tuple(m for m in MODELS if m.step == step_name)


def label(tag: str) -> str:
    """Display label of a model tag (the tag itself when unknown)."""
    return _BY_TAG[tag].label if tag in _BY_TAG else tag


def table1_rows() -> tuple[tuple[str, str], ...]:
    """(tag, label) of the results table's rows, in pipeline order."""
    return tuple((m.tag, m.label) for m in MODELS if m.table1)


def final_models(role: str) -> tuple[str, ...]:
    """Tags of a role's trained paper stages, most trained first (``student_refined``,
    ``student_transfer``): the first present is "the" teacher/student of a run."""
    return tuple(m.tag for m in reversed(MODELS) if m.role == role and m.kind == "stage")


def stage_order() -> tuple[str, ...]:
    """Keys of ``metrics.json`` ``stages`` in pipeline order: stand-ins, then timed steps."""
    return tuple(s.name for s in STANDINS) + tuple(s.name for s in STEPS if s.timed)


def step_aliases() -> dict[str, str]:
    """``sskd run --from/--only`` names -> notebook number (``adapt_teacher`` -> ``02``)."""
    out = {}
    for s in STEPS:
        for name in (s.name, *s.aliases):
            out[name] = s.notebook.split("_", 1)[0]
    return out


def step_of_notebook(stem: str) -> Step | None:
    return next((s for s in STEPS if s.notebook == stem), None)


def step_config_keys(step_name: str) -> tuple[str, ...]:
    """Config keys owned by a step: its own plus ``stages.<key>`` of the models it produces."""
    s = step(step_name)
    return s.config + tuple(f"stages.{m.config_key}" for m in models_of(step_name) if m.config_key)


def config_step(key: str) -> str | None:
    """The step owning a dotted config key (``stages.refine.train.steps`` -> ``refine``), or
    None for keys every step reads (data, models, losses, seed)."""
    for s in STEPS:
        if any(key == k or key.startswith(k + ".") for k in step_config_keys(s.name)):
            return s.name
    return None


# --------------------------------------------------------------------------- what a config produces


def _enabled(cfg: Any, key: str) -> bool:
    return bool(getattr(cfg.stages, key).enabled)


def produces(cfg: Any, tag: str) -> bool:
    """Whether a run with this config has the model ``tag`` (its stages are enabled)."""
    return all(_enabled(cfg, k) for k in model(tag).requires)


def trains(cfg: Any, tag: str) -> bool:
    """Whether the model has its own checkpoint (``teacher_adapted`` with ``adapt_1b`` off is
    the 1a teacher, evaluated under this tag, and has none)."""
    m = model(tag)
    return m.config_key is not None and produces(cfg, tag) and _enabled(cfg, m.config_key)


def pseudo_label_source(cfg: Any, tag: str) -> str | None:
    """Whose pseudo-labels ``tag`` trains on under this config (decided by the config, never by
    which files happen to exist): ``student_transfer`` distils ``teacher_adapted`` when stage 1
    runs, else ``teacher_zero_shot``."""
    return next((t for t in model(tag).pseudo_labels if produces(cfg, t)), None)


def downstream(tag: str) -> tuple[str, ...]:
    """Models derived from ``tag`` (its weights or pseudo-labels), transitively, in order."""
    out: list[str] = []
    frontier = {tag}
    for m in MODELS:
        if m.starts_from in frontier or frontier.intersection(m.pseudo_labels):
            out.append(m.tag)
            frontier.add(m.tag)
    return tuple(out)


# --------------------------------------------------------------------------- notebook inputs


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``ablations`` and ``*.options`` stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key != "ablations" and not key.endswith(".options"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _owned_by(key: str, owners: list[str]) -> bool:
    return any(key == o or key.startswith(o + ".") for o in owners)


def _result_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config without the execution keys: every value a result can depend on."""
    return {k: v for k, v in flatten(config).items() if not _owned_by(k, list(EXECUTION_KEYS))}


def notebook_inputs(config: Mapping[str, Any], notebook_stem: str) -> dict[str, Any]:
    """The config values (dotted keys) a stage notebook's results depend on.

    A notebook of the graph depends on every key except the execution keys and those owned by
    later steps (``stages.refine`` belongs to 04, so changing it leaves 00-03 valid); a step with
    ``reads`` depends on those keys only. An unknown notebook depends on the whole config.
    """
    flat = _result_keys(config)
    s = step_of_notebook(notebook_stem)
    if s is None:
        return flat
    if s.reads is not None:
        return {k: v for k, v in flat.items() if _owned_by(k, list(s.reads))}
    later = [k for t in STEPS[[x.name for x in STEPS].index(s.name) + 1:]
             for k in step_config_keys(t.name)]
    return {k: v for k, v in flat.items() if not _owned_by(k, later)}


@dataclass(frozen=True)
class Stale:
    """What a config change makes stale (:func:`stale_results`)."""

    models: tuple[str, ...]           # model tags, in pipeline order
    stages: tuple[str, ...]           # ``metrics.json`` ``stages`` keys (stand-ins and steps)
    report: bool                      # the report step's results (ablations, efficiency, report/)

    def __bool__(self) -> bool:
        return bool(self.models or self.stages or self.report)


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> set[str]:
    a, b = ({k: json.dumps(v, sort_keys=True, default=str) for k, v in _result_keys(d).items()}
            for d in (old, new))
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


_ROLE_INIT = {"teacher": TEACHER_INIT, "student": STUDENT_INIT}


def stale_results(old: Mapping[str, Any], new: Mapping[str, Any]) -> Stale:
    """The results a config change ``old`` -> ``new`` (nested dicts) makes stale, per model.

    A key no step owns (data, losses, seed) feeds every model. A role's model keys
    (``teacher.*``, ``student.*``) feed what starts from that role's initial weights and what
    is derived from it: a new student head leaves the teachers' AP and pseudo-labels standing.
    A model's own ``stages.<key>`` makes it and every model derived from it (:func:`downstream`) stale; a
    stand-in's (``stages.teacher_pretrain``) every model that starts from it. So a new stage-1a
    schedule leaves the supervised student's result standing: nothing of it came from the
    teacher. Other keys of a step (``inspect``) change none of its models' AP. The report
    (ablations, efficiency, ``report/``) is stale with any model or its own keys. Nothing is
    stale when only execution keys (``workers``) changed.
    """
    models: set[str] = set()
    stages: set[str] = set()
    report = False
    for key in _changed_keys(old, new):
        role = key.split(".", 1)[0]
        if role in _ROLE_INIT:
            models.update(downstream(_ROLE_INIT[role]))
            # and every step's wall time: side jobs (the stand-in student, the baselines) run
            # during other steps (sskd.stages.parallel), so any step's may include this role's
            stages.update(s.name for s in STANDINS if s.role == role)
            stages.update(s.name for s in STEPS if s.timed)
            continue
        owner = config_step(key)
        if owner in (None, "prepare_data"):
            return Stale(MODEL_TAGS, stage_order(), True)
        own = [m.tag for m in models_of(owner)
               if m.config_key and _owned_by(key, [f"stages.{m.config_key}"])]
        for s in STANDINS:
            if _owned_by(key, [f"stages.{s.name}"]):
                stages.add(s.name)
                own = [TEACHER_INIT if s.role == "teacher" else STUDENT_INIT]
        for root in own:
            models.update(t for t in (root, *downstream(root)) if t in _BY_TAG)
        report |= owner == "report"
    stages.update(_BY_TAG[t].step for t in models)
    return Stale(tuple(t for t in MODEL_TAGS if t in models),
                 tuple(s for s in stage_order() if s in stages), report or bool(models))


def inputs_hash(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]
