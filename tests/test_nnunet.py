"""effseg inside nnU-Net v2: `nnUNetTrainerEffseg`, `nnUNetPlannerEffseg`, `effseg.nnunet`.

The network tests build nnU-Net's PlainConvUNet from plans; the end-to-end test runs nnU-Net's
own commands on a two-case dataset made from the real CT in `EFFSEG_CT_DATA` (default
`<repo>/../shared/data/ct`; skipped when absent), built in a temporary folder: plan and
preprocess, train a few iterations with a short subclass of the effseg trainer, predict with its
checkpoint. The whole module skips when nnunetv2 is not installed (`pip install effseg[nnunet]`).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import child_env, run_python

nnunetv2 = pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed "
                               "(pip install effseg[nnunet])")
nib = pytest.importorskip("nibabel", reason="the nnU-Net dataset is written with nibabel")

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

import effseg  # noqa: E402
from effseg.integrations.nnunet.memory import memory_ratio, step_peak  # noqa: E402
from effseg.nn import InPlaceAIN  # noqa: E402
from effseg.nnunet import (  # noqa: E402
    EXT_TRAINER_DIR,
    nnUNetPlannerEffseg,
    nnUNetTrainerEffseg,
)

REPO = Path(__file__).resolve().parents[1]
CT_ROOT = Path(os.environ.get("EFFSEG_CT_DATA", REPO.parent / "shared" / "data" / "ct"))
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.usefixtures("one_thread")


def small_plans(norm: str = "torch.nn.modules.instancenorm.InstanceNorm3d") -> dict:
    """Plans of one 3d_fullres configuration, in the form nnU-Net's default planner writes:
    PlainConvUNet, conv -> InstanceNorm(affine) -> LeakyReLU(inplace), deep supervision."""
    return {
        "dataset_name": "Dataset999_Small", "plans_name": "nnUNetPlans",
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2,
            "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet."
                                      "PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 3, "features_per_stage": [4, 8, 16],
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                    "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
                    "conv_bias": True, "norm_op": norm,
                    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                    "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def build(trainer, plans: dict, deep_supervision: bool = True) -> torch.nn.Module:
    manager = PlansManager(plans)
    return trainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"),
                                              1, 3, deep_supervision)


def randomize_affine(net: torch.nn.Module) -> None:
    """Non-trivial norm weights, so that moving them over (or not) shows in the outputs."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


# ------------------------------------------------------------------ import and discovery

def test_import_without_nnunetv2_says_pip_install_effseg_nnunet():
    # A finder that makes nnunetv2 look absent, in a fresh interpreter.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nnunetv2' or name.startswith('nnunetv2.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import effseg\n"
        "assert 'nnunetv2' not in sys.modules\n"
        "try:\n"
        "    import effseg.nnunet\n"
        "except ImportError as e:\n"
        "    print('ERROR', e)\n")
    result = run_python(code, env=child_env())
    assert result.returncode == 0, result.stderr
    assert "ERROR" in result.stdout and "pip install effseg[nnunet]" in result.stdout


def test_plain_import_of_effseg_does_not_import_nnunet():
    result = run_python("import sys, effseg; print('nnunetv2' in sys.modules)", env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_nnunet_path_is_the_folder_nnunet_finds_the_trainer_in(monkeypatch):
    result = subprocess.run([sys.executable, "-m", "effseg", "nnunet-path"], capture_output=True,
                            text=True, env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder == EXT_TRAINER_DIR and folder.is_dir()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", str(folder))
    # The very class of effseg's package, not a second copy imported from the folder.
    assert recursive_find_trainer_class_by_name("nnUNetTrainerEffseg") is nnUNetTrainerEffseg


def test_nnunet_plan_reports_bad_input_in_one_line(tmp_path):
    env = child_env(nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path))
    for args, message in ((["-d", "999"], "Could not find a dataset with the ID 999"),
                          (["-d", "999", "-gpu_memory_target", "0"], "must be positive")):
        result = subprocess.run([sys.executable, "-m", "effseg", "nnunet-plan", *args],
                                capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("effseg nnunet-plan: error: ") and message in result.stderr
        assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ the converted network

def test_trainer_network_holds_effseg_norms_with_stock_state_dict_keys():
    plans = small_plans()
    stock, converted = build(nnUNetTrainer, plans), build(nnUNetTrainerEffseg, plans)
    fused = [m for m in converted.modules() if isinstance(m, InPlaceAIN)]
    # Two convs per stage: 3 encoder stages and 2 decoder stages.
    assert len(fused) == 10
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in converted.modules())
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in converted.modules())
    assert all(m.activation == "leaky_relu" and m.activation_param == 0.01 for m in fused)
    assert list(stock.state_dict()) == list(converted.state_dict())


def test_float64_outputs_and_gradients_equal_stock_nnunet_and_weights_load_both_ways():
    plans = small_plans()
    stock = build(nnUNetTrainer, plans).double()
    randomize_affine(stock)
    converted = build(nnUNetTrainerEffseg, plans).double()
    converted.load_state_dict(stock.state_dict())  # stock weights into effseg's network
    x = torch.randn(2, 1, 16, 24, 16, dtype=torch.float64)
    results = []
    for net in (stock, converted):
        net.train()
        xi = x.clone().requires_grad_()
        outs = net(xi)
        assert len(outs) == 2  # deep supervision: full and half resolution
        weights = [torch.randn(o.shape, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(i))
                   for i, o in enumerate(outs)]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        results.append(([o.detach() for o in outs], xi.grad,
                        {n: p.grad for n, p in net.named_parameters()}))
    (ys, gs, ps), (yc, gc, pc) = results
    for a, b in zip(yc, ys):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(gc, gs, rtol=1e-7, atol=1e-12)
    assert ps.keys() == pc.keys()
    for name in ps:
        torch.testing.assert_close(pc[name], ps[name], rtol=1e-7, atol=1e-12, msg=name)
    # and effseg's weights into the stock network, in inference as nnU-Net predicts
    back = build(nnUNetTrainer, plans, deep_supervision=False).double().eval()
    back.load_state_dict(converted.state_dict())
    effseg_eval = build(nnUNetTrainerEffseg, plans, deep_supervision=False).double().eval()
    effseg_eval.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(effseg_eval(x.clone()), back(x.clone()), rtol=1e-7,
                                   atol=1e-12)


def test_trainer_refuses_plans_measured_with_other_convert_options(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = small_plans()
    plans["effseg"] = {"convert_options": {}}  # measured for the fused-only trainer
    with pytest.raises(ValueError, match="Plan again"):
        nnUNetTrainerEffseg(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1, "b": 2},
                                                      "channel_names": {"0": "CT"}},
                            torch.device("cpu"))


# ------------------------------------------------------------------ memory, measured exactly

def test_memory_ratio_of_the_nnunet_network_is_measured_and_linear():
    stock = build(nnUNetTrainer, small_plans())
    measured = memory_ratio(stock, (8, 8, 8), 1)
    # grown from 16 x 8 x 8 (the deepest map 2 x 1 x 1) to MIN_VOXELS, where peaks are linear
    assert measured.sizes == ((32, 32, 32), (64, 32, 32))
    # The premise of the slope: the peak grows linearly with the voxels. A third size lies on
    # the line through the two, to the byte (peak_allocated is exact).
    converted, _ = effseg.convert(stock)
    for net, peaks in ((stock, measured.stock_peaks), (converted, measured.effseg_peaks)):
        assert step_peak(net, (48, 32, 32), 1) * 2 == peaks[0] + peaks[1]
    # Fused in-place norms keep one tensor per conv unit where stock keeps two (its conv output
    # and its activation output); the concatenations and transposed convs of the decoder stay:
    # the converted network holds 0.595 of stock's bytes per voxel at its step's peak.
    assert measured.stock_peaks == (9225152, 18449344)
    assert measured.effseg_peaks == (5489024, 10977664)
    assert measured.ratio == pytest.approx(0.5950, abs=1e-4)
    # The stock network is left as it was.
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in stock.modules())


def test_memory_ratio_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        memory_ratio("not a network", (4, 4, 4), 1)
    with pytest.raises(ValueError, match="unit"):
        memory_ratio(torch.nn.Identity(), (0, 4, 4), 1)


# ------------------------------------------------------------------ nnU-Net end to end (CPU)

TEST_TRAINER = '''
import torch
from effseg.nnunet import nnUNetTrainerEffseg


class nnUNetTrainerEffsegTwoSteps(nnUNetTrainerEffseg):
    """One epoch of two iterations, no mirroring (nor mirrored test-time augmentation): enough
    to run every part of nnU-Net's training and validation on CPU in the test suite."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial, _ = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size())
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial, None
'''

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}
# TotalSegmentator ids of ts_example_ct (labels.json): liver 5, spleen 1, kidneys 2 and 3.
TS_IDS = {1: (5,), 2: (1,), 3: (2, 3)}


def write_dataset(raw: Path) -> Path:
    """Dataset501: ts_example_ct and its left-right mirror (liver, spleen, kidneys)."""
    folder = CT_ROOT / "ts_example_ct"
    if not (folder / "ct.nii.gz").is_file():
        pytest.skip(f"real CT case 'ts_example_ct' not found in {CT_ROOT}; set EFFSEG_CT_DATA "
                    "to the folder described by shared/data/ct/PROVENANCE.md")
    root = raw / "Dataset501_EffsegCT"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    ct = nib.load(folder / "ct.nii.gz")
    image = np.asarray(ct.dataobj)
    seg = np.asarray(nib.load(folder / "seg_totalseg_fast.nii.gz").dataobj)
    labels = np.zeros(seg.shape, np.uint8)
    for new, old in TS_IDS.items():
        labels[np.isin(seg, old)] = new
    for case, flip in (("ct", False), ("ctmirror", True)):
        img, lab = (image[::-1].copy(), labels[::-1].copy()) if flip else (image, labels)
        nib.save(nib.Nifti1Image(img, ct.affine), root / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, ct.affine), root / "labelsTr" / f"{case}.nii.gz")
    (root / "imagesTs" / "ct_0000.nii.gz").symlink_to(folder / "ct.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 2,
         "file_ending": ".nii.gz"}))
    return root


def nnunet_env(tmp: Path, ext_dir: Path) -> dict:
    # nnUNet_n_proc_DA=0 breaks planning on 2 cores (torch.set_num_threads(0)): 1 process.
    return child_env(nnUNet_raw=str(tmp / "raw"), nnUNet_preprocessed=str(tmp / "preprocessed"),
                     nnUNet_results=str(tmp / "results"), nnUNet_n_proc_DA="1",
                     nnUNet_def_n_proc="1", nnUNet_compile="false",
                     nnUNet_extTrainer=os.pathsep.join([str(EXT_TRAINER_DIR), str(ext_dir)]))


def run(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, args))} failed:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# Training at 6 mm keeps the CPU run short; the planner comparison below plans at 1.5 mm, where
# stock nnU-Net's 8 GB patch is smaller than the image.
TRAIN_SPACING = ["6", "6", "6"]


@pytest.fixture(scope="module")
def nnunet_run(tmp_path_factory):
    """nnU-Net's commands, in the order a user types them, with effseg's trainer and plans."""
    tmp = tmp_path_factory.mktemp("nnunet")
    write_dataset(tmp / "raw")
    ext = tmp / "ext_trainers"
    ext.mkdir()
    (ext / "effseg_test_trainers.py").write_text(TEST_TRAINER)
    env = nnunet_env(tmp, ext)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "1",
         "-npfp", "1", "--no_pp", "-overwrite_target_spacing", *TRAIN_SPACING], env)
    planned = run([sys.executable, "-m", "effseg", "nnunet-plan", "-d", "501", "-np", "1",
                   "-overwrite_target_spacing", *TRAIN_SPACING], env)
    assert "-p nnUNetPlansEffseg" in planned.stdout
    trained = run([BIN / "nnUNetv2_train", "501", "3d_fullres", "all", "-tr",
                   "nnUNetTrainerEffsegTwoSteps", "-p", "nnUNetPlansEffseg", "-device", "cpu"],
                  env)
    run([BIN / "nnUNetv2_predict", "-i", tmp / "raw" / "Dataset501_EffsegCT" / "imagesTs",
         "-o", tmp / "pred", "-d", "501", "-c", "3d_fullres", "-f", "all", "-tr",
         "nnUNetTrainerEffsegTwoSteps", "-p", "nnUNetPlansEffseg", "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env)
    return tmp, env, trained


def model_folder(tmp: Path) -> Path:
    return (tmp / "results" / "Dataset501_EffsegCT" /
            "nnUNetTrainerEffsegTwoSteps__nnUNetPlansEffseg__3d_fullres")


@pytest.mark.slow
def test_nnunet_trains_with_effseg_and_predicts_with_its_checkpoint(nnunet_run):
    tmp, env, trained = nnunet_run
    folder = model_folder(tmp)
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["effseg"]["trainer"] == "nnUNetTrainerEffseg"
    assert plans["effseg"]["convert_options"] == nnUNetTrainerEffseg.effseg_convert_options
    assert 0 < plans["effseg"]["memory_ratio"]["3d_fullres"]["ratio"] < 1
    log = next((folder / "fold_all").glob("training_log_*.txt")).read_text()
    assert "norm + activation pair(s) fused into in-place modules" in log
    assert (folder / "fold_all" / "validation" / "summary.json").is_file()

    checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerEffsegTwoSteps"
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    # The checkpoint loads, strictly, into stock nnU-Net's network ...
    stock = nnUNetTrainer.build_network_architecture(manager, config, 1, len(LABELS), False)
    stock.load_state_dict(checkpoint["network_weights"])
    # ... which predicts what effseg's network predicted through nnUNetv2_predict.
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(
        stock, manager, config, [checkpoint["network_weights"]],
        json.loads((folder / "dataset.json").read_text()), "nnUNetTrainer", None)
    source = str(tmp / "raw" / "Dataset501_EffsegCT" / "imagesTs" / "ct_0000.nii.gz")
    stock_pred = predictor.predict_from_files([[source]], None, save_probabilities=False,
                                              num_processes_preprocessing=1,
                                              num_processes_segmentation_export=1)[0]
    written = nib.load(tmp / "pred" / "ct.nii.gz")
    effseg_pred = np.asarray(written.dataobj)
    ct = nib.load(source)
    assert effseg_pred.shape == ct.shape
    np.testing.assert_allclose(written.affine, ct.affine, atol=1e-4)
    assert set(np.unique(effseg_pred)) <= set(LABELS.values())
    # nnU-Net's SimpleITK writer and reader: the array of the file is (z, y, x) of the returned one
    agreement = np.mean(np.transpose(stock_pred, (2, 1, 0)) == effseg_pred)
    assert agreement > 0.999


@pytest.mark.slow
def test_effseg_predictor_network_holds_effseg_modules(nnunet_run, monkeypatch):
    tmp, env, _ = nnunet_run
    for name in ("nnUNet_extTrainer", "nnUNet_results"):
        monkeypatch.setenv(name, env[name])
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder(tmp)), ("all",))
    fused = [m for m in predictor.network.modules() if isinstance(m, InPlaceAIN)]
    assert fused and not any(isinstance(m, torch.nn.InstanceNorm3d)
                             for m in predictor.network.modules())


@pytest.mark.slow
def test_planner_patch_vs_stock_nnunet_for_8gb(nnunet_run, monkeypatch):
    tmp, env, _ = nnunet_run
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(name, env[name])
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    spacing = [1.5, 1.5, 1.5]
    stock = ExperimentPlanner(501, 8, plans_name="nnUNetPlans_1.5mm",
                              overwrite_target_spacing=spacing).plan_experiment()
    planner = nnUNetPlannerEffseg(501, 8, plans_name="nnUNetPlansEffseg_1.5mm",
                                  overwrite_target_spacing=spacing)
    ours = planner.plan_experiment()
    stock_patch = stock["configurations"]["3d_fullres"]["patch_size"]
    our_patch = ours["configurations"]["3d_fullres"]["patch_size"]
    image = ours["configurations"]["3d_fullres"]["median_image_size_in_voxels"]
    ratio = ours["effseg"]["memory_ratio"]["3d_fullres"]["ratio"]
    gain = math.prod(our_patch) / math.prod(stock_patch)
    print(f"\n8 GB at 1.5 mm: stock patch {stock_patch}, effseg patch {our_patch} "
          f"(image {image}), {gain:.2f}x the voxels; measured memory ratio {ratio:.3f}")
    assert math.prod(stock_patch) < math.prod(image)  # stock crops: there is room to grow
    # The patch grows by about 1 / ratio, less what nnU-Net's patch steps (multiples of the
    # network's total stride) and topology changes cost.
    assert gain >= 0.8 / ratio
