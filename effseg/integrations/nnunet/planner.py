"""`nnUNetPlannerEffseg`: nnU-Net v2's experiment planner for effseg's converted networks.

nnU-Net plans a configuration by shrinking the patch from (at most) the median image until its
memory estimate for the network (`static_estimate_VRAM_usage`, a count of feature-map elements)
fits the GPU-memory target, then spends what is left on the batch size. This planner keeps that
search and its reference values, and multiplies the estimate by effseg's measured memory ratio
for the very network planned (`effseg.integrations.nnunet.memory.memory_ratio`, once per
topology: converted with `nnUNetTrainerEffseg.effseg_convert_options` vs stock, bytes per voxel
of a training step). So a network that needs 0.58x the memory gets about 1/0.58 the voxels for
the same target, up to the whole median image.

The plans (default name `nnUNetPlansEffseg`) are nnU-Net plans plus a top-level "effseg" entry:
the trainer to use, the convert options and each configuration's measurement.

nnU-Net 2.8 looks experiment planners up only inside its own package, so `-pl` cannot reach
this one: `plan_and_preprocess` (`python -m effseg nnunet-plan -d D`) runs nnU-Net's fingerprint
extraction, this planner and nnU-Net's preprocessing in turn.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

from . import import_error

try:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
except ImportError as exc:
    raise import_error(exc) from exc

from .memory import MemoryRatio, memory_ratio
from .trainer import PLANS_KEY, nnUNetTrainerEffseg


def _unit(strides: Sequence, dims: int) -> tuple[int, ...]:
    """Total stride per axis of nnU-Net's per-stage strides (ints or per-axis lists)."""
    per_stage = [[s] * dims if isinstance(s, int) else list(s) for s in strides]
    return tuple(math.prod(stage[axis] for stage in per_stage) for axis in range(dims))


class nnUNetPlannerEffseg(ExperimentPlanner):
    """nnU-Net's default planner with effseg's measured memory ratio in its estimate."""

    trainer_class = nnUNetTrainerEffseg

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor",
                 plans_name: str = "nnUNetPlansEffseg", overwrite_target_spacing=None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name, overwrite_target_spacing, suppress_transpose)
        self.convert_options = dict(self.trainer_class.effseg_convert_options)
        self.memory_ratios: dict[str, MemoryRatio] = {}

    @staticmethod
    def _key(input_channels, output_channels, arch_class_name, arch_kwargs) -> str:
        return json.dumps([input_channels, output_channels, arch_class_name, arch_kwargs],
                          sort_keys=True, default=str)

    def memory_ratio(self, input_channels: int, output_channels: int, arch_class_name: str,
                     arch_kwargs: dict, arch_kwargs_req_import) -> MemoryRatio:
        """The measured ratio for this network (measured once per topology)."""
        key = self._key(input_channels, output_channels, arch_class_name, arch_kwargs)
        if key not in self.memory_ratios:
            # Deep supervision on, as in training: its heads' outputs are part of the step.
            network = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import,
                                             input_channels, output_channels, allow_init=False,
                                             deep_supervision=True)
            unit = _unit(arch_kwargs["strides"], len(arch_kwargs["kernel_sizes"][0]))
            self.memory_ratios[key] = memory_ratio(network, unit, input_channels,
                                                   self.convert_options)
        return self.memory_ratios[key]

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels,
                                   arch_class_name, arch_kwargs, arch_kwargs_req_import):
        # nnU-Net calls this through the instance, so overriding its staticmethod with a method
        # puts the measurement into every estimate of its patch and batch-size search.
        stock = ExperimentPlanner.static_estimate_VRAM_usage(
            patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
            arch_kwargs_req_import)
        ratio = self.memory_ratio(input_channels, output_channels, arch_class_name, arch_kwargs,
                                  arch_kwargs_req_import).ratio
        return stock * ratio

    def save_plans(self, plans):
        configurations = {}
        channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality")))
        for name, config in plans["configurations"].items():
            arch = config.get("architecture")
            if arch is None:  # a configuration that inherits another's network
                continue
            key = self._key(channels, len(self.dataset_json["labels"]),
                            arch["network_class_name"], arch["arch_kwargs"])
            measured = self.memory_ratios.get(key)
            if measured is not None:
                configurations[name] = measured.as_dict()
        plans[PLANS_KEY] = {
            "trainer": self.trainer_class.__name__,
            "convert_options": self.convert_options,
            "gpu_memory_target_in_gb": self.UNet_vram_target_GB,
            "memory_ratio": configurations,
        }
        super().save_plans(plans)


def plan_and_preprocess(dataset_ids: Sequence[int], gpu_memory_target_in_gb: float = 8,
                        configurations: Sequence[str] = ("3d_fullres",),
                        num_processes: int = 1, preprocess: bool = True,
                        overwrite_target_spacing: Sequence[float] | None = None,
                        plans_name: str = "nnUNetPlansEffseg",
                        planner_class: type = nnUNetPlannerEffseg) -> str:
    """What `nnUNetv2_plan_and_preprocess -pl ...` would do with this planner: the dataset
    fingerprint (when missing), the plans, then nnU-Net's preprocessing of `configurations`.
    Returns the plans identifier (what `nnUNetv2_train -p` takes)."""
    from os.path import isfile, join

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        preprocess as nnunet_preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    if gpu_memory_target_in_gb is None or not gpu_memory_target_in_gb > 0:
        raise ValueError(f"gpu_memory_target_in_gb must be positive, got {gpu_memory_target_in_gb}")
    identifier = plans_name
    for d in dataset_ids:
        name = convert_id_to_dataset_name(int(d))
        if not isfile(join(nnUNet_preprocessed, name, "dataset_fingerprint.json")):
            extract_fingerprint_dataset(int(d), num_processes=num_processes, clean=True)
        _, identifier = plan_experiment_dataset(
            int(d), planner_class, gpu_memory_target_in_gb,
            overwrite_target_spacing=overwrite_target_spacing, overwrite_plans_name=plans_name)
        if preprocess:
            nnunet_preprocess([int(d)], identifier, list(configurations), [num_processes])
    return identifier


__all__ = ["nnUNetPlannerEffseg", "plan_and_preprocess"]
