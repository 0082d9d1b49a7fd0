"""detectron2 integration: dataset registration, format conversion, evaluators, detectron2 models.

Optional: ``import sskd`` never imports detectron2; importing this module without detectron2
raises an ImportError that says how to install it. Parts (each its own module):

* registration (:mod:`.detectron2_data`): :func:`register_dataset`, :func:`register_run`,
  :func:`set_train_datasets`, :func:`unregister`;
* conversion (:mod:`.detectron2_convert`): :func:`record_to_dict`, :func:`dict_to_record`,
  :func:`prediction_to_instances`, :func:`instances_to_prediction`, :func:`record_to_instances`,
  :func:`instances_to_record`, :func:`targets_to_instances`;
* evaluation (:mod:`.detectron2_eval`): :func:`evaluate_with_detectron2` (COCOEvaluator,
  CityscapesInstanceEvaluator);
* models (:mod:`.detectron2_model`): :class:`Detectron2Segmenter`, registered as
  ``"detectron2"`` in :func:`sskd.models.build_model`.

Example::

    from sskd.integrations import detectron2 as d2
    names = d2.register_run("runs/demo")           # sskd_demo_labeled, ..._val, ..._pseudo_<tag>
    model = sskd.models.build_model("detectron2", 3, size="tiny")
    metrics = d2.evaluate_with_detectron2(val, predictions)
"""

from __future__ import annotations

from sskd.integrations.detectron2_require import (INSTALL_HINT, compiled_ops_available,
                                                  detectron2_available, require_detectron2)

require_detectron2()

from sskd.integrations.detectron2_convert import (dict_to_record, instances_to_prediction,  # noqa: E402
                                                  instances_to_record, mask_to_polygons,
                                                  prediction_to_instances, record_to_dict,
                                                  record_to_instances, targets_to_instances)
from sskd.integrations.detectron2_data import (class_colors, register_dataset,  # noqa: E402
                                               register_run, set_train_datasets, unregister)
from sskd.integrations.detectron2_eval import (cityscapes_available,  # noqa: E402
                                               evaluate_with_detectron2)
from sskd.integrations.detectron2_model import (DEFAULT_CONFIG, SIZES,  # noqa: E402
                                                Detectron2Segmenter, build_d2_config,
                                                build_detectron2, zoo_config_path)

__all__ = [
    "DEFAULT_CONFIG", "INSTALL_HINT", "SIZES", "Detectron2Segmenter", "build_d2_config",
    "build_detectron2", "cityscapes_available", "class_colors", "compiled_ops_available",
    "detectron2_available", "dict_to_record", "evaluate_with_detectron2", "instances_to_prediction",
    "instances_to_record", "mask_to_polygons", "prediction_to_instances", "record_to_dict",
    "record_to_instances", "register_dataset", "register_run", "require_detectron2",
    "set_train_datasets", "targets_to_instances", "unregister", "zoo_config_path",
]
