"""`nnUNetTrainerEffseg`: nnU-Net v2's trainer with the plans' network converted by effseg.

The network is the one nnU-Net builds from the plans, passed through
`effseg.convert(network, inplace=True, **nnUNetTrainerEffseg.effseg_convert_options)`: each
InstanceNorm / BatchNorm + LeakyReLU pair becomes one in-place module (`InPlaceAIN` /
`InPlaceABN`) with the norm's own parameters, so the state-dict keys, the checkpoint format and
the outputs stay nnU-Net's. A `checkpoint_final.pth` of this trainer loads into nnU-Net's stock
network and the other way round. Training, data loading, loss, validation and inference are
nnU-Net's.

`effseg_convert_options` is the one place the conversion is configured: the experiment planner
(`nnUNetPlannerEffseg`) measures the memory of the network converted with the same options, and
records them in the plans; this trainer refuses plans measured with other options, since their
patch size was chosen for another memory footprint.

nnU-Net finds this class through `nnUNet_extTrainer` (`python -m effseg nnunet-path`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import import_error

try:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import (
        ConfigurationManager,
        PlansManager,
    )
except ImportError as exc:
    raise import_error(exc) from exc

from ..convert import convert
from ...nn.norm_act import _InPlaceNormAct

# Where the planner records what it measured, in the plans file.
PLANS_KEY = "effseg"


class nnUNetTrainerEffseg(nnUNetTrainer):
    """nnU-Net's trainer; its network holds effseg's fused in-place norm + activation modules."""

    # Keyword arguments of effseg.convert for every network this trainer builds, at training and
    # at inference alike; the planner measures memory with the same ones. Recomputing segments
    # (stored inputs and replayed statistics only) on top of the fused norms.
    effseg_convert_options: dict = {"recompute": True}

    # nnU-Net records the constructor's arguments by inspecting this very signature.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        recorded = plans.get(PLANS_KEY, {}).get("convert_options")
        if recorded is not None and recorded != self.effseg_convert_options:
            raise ValueError(
                f"{type(self).__name__}: the plans '{plans.get('plans_name')}' were made for a "
                f"network converted with effseg options {recorded}, this trainer converts with "
                f"{self.effseg_convert_options}: the planned patch would not fit the same GPU "
                "memory. Plan again (python -m effseg nnunet-plan) or use a trainer with those "
                "options.")
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # A classmethod, not nnU-Net's staticmethod, so that a subclass's options apply; nnU-Net
        # calls it on the class and on instances with the same arguments either way.
        network = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels,
            enable_deep_supervision)
        network, _ = convert(network, inplace=True, **cls.effseg_convert_options)
        return network

    def _do_i_compile(self):
        # The recomputing program runs its own checkpointing, which torch.compile has not been
        # checked against inside nnU-Net: it stays eager.
        if self.effseg_convert_options.get("recompute"):
            self.print_to_log_file("effseg: torch.compile off (recomputing network)")
            return False
        return super()._do_i_compile()

    def initialize(self):
        super().initialize()
        fused = sum(isinstance(m, _InPlaceNormAct) for m in self.network.modules())
        self.print_to_log_file(
            f"effseg: {fused} norm + activation pair(s) fused into in-place modules "
            f"(convert options {self.effseg_convert_options})")
        if fused == 0:
            self.print_to_log_file(
                "effseg: WARNING: no pair could be fused (see effseg.convert's report for why); "
                "this network trains with stock memory")


class nnUNetTrainerEffsegFused(nnUNetTrainerEffseg):
    """Fused in-place norms only, no recomputation: a smaller saving at stock speed."""

    effseg_convert_options: dict = {}


__all__ = ["PLANS_KEY", "nnUNetTrainerEffseg", "nnUNetTrainerEffsegFused"]
