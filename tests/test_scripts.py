"""scripts/ablation.py and scripts/benchmark.py: arguments, commands, resumability, tables.

The ablation tables are written from metrics.json files made by the real evaluation code
(metrics.summarize + report's JSON conversion) and checked against AUCs and Dice computed here
with sklearn / numpy. The benchmark runs one real figure (--quick, Hungarian) in-process.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import ROOT, load_config

from lidia_jax.evaluation import metrics as metrics_lib
from lidia_jax.evaluation import report as report_lib

LESIONS = ("HCC", "ICC", "meta", "heman", "FNH", "cyst", "calc", "others")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation():
    return _load_script("ablation")


@pytest.fixture(scope="module")
def benchmark():
    return _load_script("benchmark")


# Patients' true lesion codes (2 HCC .. 9 others): every class present in some but not all
# patients except calc (8), absent everywhere -> no AUC.
PATIENT_CODES = [[2], [3, 4], [2, 5], [6], [7, 9], [4], [9], [5, 3]]


def _write_fake_metrics(workdir, seed, with_lesion_pred):
    """A metrics.json as evaluate_cache writes it; returns (truth [N, 8], scores [N, 8], dice)."""
    rng = np.random.default_rng(seed)
    records, truth, scores = [], [], []
    inter = gt_vox = pred_vox = 0
    for k, codes in enumerate(PATIENT_CODES):
        gt_seg = np.ones((2, 3, 3), np.uint8)
        gt_seg[0, 0, :2] = codes[0]  # a 2-voxel true lesion
        gt_inst = (gt_seg >= 2).astype(np.uint16)
        pred_seg = np.ones_like(gt_seg)
        if with_lesion_pred[k]:
            pred_seg[0, 0, 1:3] = codes[0]  # overlaps the truth by one voxel
        pred_inst = (pred_seg >= 2).astype(np.uint16)
        probs = rng.random(8)
        records.append(metrics_lib.case_record(
            f"case_{k}", gt_seg, gt_inst, {1: codes[0]}, pred_seg, pred_inst,
            {1: codes[0]} if with_lesion_pred[k] else {}, probs, float(rng.random()), 0.2,
            patient_codes=codes))
        truth.append([c in codes for c in range(2, 10)])
        scores.append(probs)
        inter += int(with_lesion_pred[k])
        gt_vox += 2
        pred_vox += 2 * int(with_lesion_pred[k])
    summary = metrics_lib.summarize(records, LESIONS, ("HCC", "ICC", "meta"),
                                    ("heman", "FNH", "cyst", "calc"))
    out = pathlib.Path(workdir) / "test_report"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(report_lib._json_ready(summary)))
    (pathlib.Path(workdir) / "test_metrics.json").write_text(json.dumps({"auc8": 0.0}))
    return np.array(truth), np.array(scores), 2.0 * inter / (gt_vox + pred_vox)


def _expected_aucs(truth, scores):
    return [roc_auc_score(truth[:, c], scores[:, c]) if 0 < truth[:, c].sum() < len(truth)
            else None for c in range(8)]


def test_ablation_rows_are_valid_configs(ablation):
    """Every row's config string parses and sets what its table says it changes."""
    expect = {"t2_early": ("per_voxel", "early", True, False, "volume"),
              "t2_hemis": ("per_voxel", "hemis", False, False, "volume"),
              "t2_convlstm": ("per_voxel", "convlstm", False, False, "volume"),
              "t2_ifm": ("per_voxel", "ifm", False, False, "volume"),
              "t3_baseline": ("mask2former", "early", False, False, "volume"),
              "t3_focal": ("mask2former", "early", False, False, "volume"),
              "t3_livermax": ("mask2former", "early", False, False, "livermax"),
              "t3_ifm": ("mask2former", "ifm", False, False, "livermax"),
              "t3_acl": ("mask2former", "ifm", False, False, "livermax"),
              "t3_sam": ("mask2former", "ifm", False, True, "livermax"),
              "t3_pooled": ("mask2former", "ifm", False, False, "livermax"),
              "t4_early": ("mask2former", "early", False, False, "livermax"),
              "t4_no_acl": ("mask2former", "ifm", False, False, "livermax"),
              "t4_volume": ("mask2former", "ifm", False, False, "volume"),
              "t4_focal": ("mask2former", "ifm", False, False, "livermax"),
              "t4_sam": ("mask2former", "ifm", False, True, "livermax"),
              "t4_no_delayed": ("mask2former", "ifm", False, False, "livermax")}
    assert set(expect) == set(ablation.ROWS)
    for name, (head, fusion, drop_d, sam, score) in expect.items():
        c = ablation.row_config("demo", name, "/tmp/r", steps=7)
        assert (c.model.head, c.model.fusion, c.data.drop_delayed, c.optim.sam,
                c.inference.patient_score) == (head, fusion, drop_d, sam, score), name
        assert c.train.num_steps == 7
        assert c.optim.lr == (1e-2 if head == "per_voxel" else load_config("demo").optim.lr)
        assert c.input.patch_size == load_config("demo").input.patch_size
        assert c.data.root == "/tmp/r/data/synthetic"
    cls = {n: ablation.row_config("smoke", n, "/r").loss for n in ablation.ROWS}
    assert cls["t3_baseline"].cls_loss == "ce" and cls["t3_focal"].cls_loss == "focal"
    assert cls["t3_acl"].cls_loss == "focal" and cls["t3_pooled"].cls_loss == "ce"
    assert cls["t3_ifm"].contrastive == "none" and cls["t3_acl"].contrastive == "acl"
    table4 = {n for n, row in ablation.ROWS.items() if row.table == 4}
    rows = {n: ablation.row_config("demo", n, "/r") for n in ablation.ROWS}
    pooled = {n for n, c in rows.items() if c.model.pooled_intensity}
    assert pooled == {"t3_pooled"} | table4  # the paper's rows are the paper's model
    aux = {n for n, c in rows.items() if c.model.aux_semantic}
    assert aux == {"t3_pooled"} | table4
    # The demo config is t4_focal's but for the weights' moving average, lesion copy-paste,
    # synthetic calcifications, eight fused channels, 3,800 steps and the lesion forest, which no
    # row has (they were measured before them); t3_pooled, Table 4's base, is it with
    # cross-entropy.
    demo = load_config("demo,ema=0,paste=0,synth_calc=0,fusion_features=4,steps=3400,forest=0")
    focal = rows["t4_focal"]
    assert {(c.optim.ema_decay, c.input.paste_prob, c.input.synth_calc_prob,
             c.model.fusion_features, c.train.num_steps, c.inference.lesion_forest)
            for c in rows.values()} == {(0, 0, 0, 4, 3400, False)}
    assert focal.model == demo.model and focal.loss == demo.loss and focal.optim == demo.optim
    assert focal.inference == demo.inference and focal.input == demo.input
    assert focal.train == demo.train

    # Table 4: each row's config differs from the base's in the one field it names.
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    base_flat = flat(rows[ablation.T4_BASE].to_dict())
    changed = {"t4_early": {"model.fusion": "early"}, "t4_no_acl": {"loss.contrastive": "none"},
               "t4_volume": {"inference.patient_score": "volume"},
               "t4_focal": {"loss.cls_loss": "focal"}, "t4_sam": {"optim.sam": True},
               "t4_no_delayed": {}}
    assert set(changed) == table4
    for name, want in changed.items():
        got = flat(rows[name].to_dict())
        assert set(got) == set(base_flat), name
        assert {k: v for k, v in got.items() if v != base_flat[k]} == want, name


def test_ablation_dry_run_commands(ablation, capsys, tmp_path):
    assert ablation.main(["--root", str(tmp_path), "--base", "smoke", "--steps", "3",
                          "--rows", "t2_ifm", "delayed", "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    assert len(lines) == 2
    train = lines[0]
    assert "-m lidia_jax.main" in train and f"--workdir={tmp_path}/t2_ifm" in train
    assert "lidia.py:smoke,head=per_voxel" in train and "fusion=ifm" in train
    assert f"--config.data.root={tmp_path}/data/synthetic" in train
    assert f"--config.data.cache_dir={tmp_path}/data/preprocessed" in train
    assert train.endswith("--config.train.num_steps=3")
    assert "--evaluate-row=delayed" in lines[1] and "--steps=3" in lines[1]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    with pytest.raises(SystemExit):
        ablation.parse_args(["--base", "nonsense"])
    with pytest.raises(SystemExit):
        ablation.parse_args(["--rows", "t9_unknown"])


def test_ablation_resume_states(ablation, tmp_path):
    work = tmp_path / "t3_sam"
    assert ablation.row_status(work) == "new"
    (work / "checkpoints" / "2").mkdir(parents=True)
    assert ablation.row_status(work) == "partial"
    (work / "test_metrics.json").write_text("{}")
    (work / "test_report").mkdir()
    (work / "test_report" / "metrics.json").write_text("{}")
    assert ablation.row_status(work) == "done"
    args = ablation.parse_args(["--root", str(tmp_path), "--base", "smoke"])
    argv = ablation.row_command("t3_sam", args)
    (work / ablation.ROW_FILE).write_text(json.dumps({"command": argv}))
    ablation.check_same_command(work, argv)  # same command: accepted
    ablation.check_same_command(work, ["/other/python"] + argv[1:])  # other interpreter too
    # Commands name the checkout's files relative to it (the rows run from ROOT), so the same
    # row recorded by another clone is the same command. (The interpreter, argv[0], may live in
    # the checkout, as CI's .venv does; it is not compared.)
    for name in ablation.ALL_ROWS:
        assert not any(str(ablation.ROOT) in a for a in ablation.row_command(name, args)[1:]), name
    other = ablation.row_command("t3_sam", ablation.parse_args(
        ["--root", str(tmp_path), "--base", "smoke", "--steps", "5"]))
    with pytest.raises(SystemExit, match="Delete"):
        ablation.check_same_command(work, other)


def test_ablation_evaluation_only_rows(ablation, tmp_path):
    """t3_livermax is t3_focal's model with another patient score: evaluated, not trained."""
    focal = ablation.row_config("demo", "t3_focal", "/r").to_dict()
    livermax = ablation.row_config("demo", "t3_livermax", "/r").to_dict()
    assert focal["inference"]["patient_score"] == "volume"
    assert livermax["inference"]["patient_score"] == "livermax"
    focal.pop("inference"), livermax.pop("inference")
    assert focal == livermax  # everything that shapes training is the same
    assert [n for n in ablation.ALL_ROWS if ablation.source_of(n)] == [
        "t3_livermax", "t4_volume", "t4_no_delayed", "delayed"]
    assert [n for n in ablation.ALL_ROWS if ablation.without_delayed(n)] == [
        "t4_no_delayed", "delayed"]
    assert {ablation.source_of(n) for n in ("t4_volume", "t4_no_delayed")} == {"t3_pooled"}
    args = ablation.parse_args(["--root", str(tmp_path), "--base", "smoke"])
    assert "--evaluate-row=t3_livermax" in ablation.row_command("t3_livermax", args)
    assert ablation.run_row("t3_livermax", args, log=lambda *a: None) == "blocked"
    assert not (tmp_path / "t3_livermax").exists()


@pytest.mark.slow
def test_ablation_smoke_rows_end_to_end(ablation, tmp_path):
    """A trained row and the row that re-scores its checkpoint, through the real commands."""
    assert ablation.main(["--root", str(tmp_path), "--base", "smoke", "--steps", "2",
                          "--rows", "t3_focal", "t3_livermax"]) == 0
    data = json.loads((tmp_path / "ablation.json").read_text())
    focal, livermax = (data["rows"][n]["metrics"] for n in ("t3_focal", "t3_livermax"))
    assert data["rows"]["t3_livermax"]["status"] == "done"
    # Same checkpoint, same segmentation: the lesion figures agree, only the score differs.
    for key in ("lesion_dice", "lesion_sensitivity", "lesion_precision"):
        assert livermax[key] == pytest.approx(focal[key]), key
    extra = json.loads((tmp_path / "t3_livermax" / "test_metrics.json").read_text())
    assert extra["source"] == "t3_focal" and extra["checkpoint_step"] == 2
    report = json.loads((tmp_path / "t3_livermax" / "test_report" / "metrics.json").read_text())
    assert report["num_cases"] == focal["num_cases"]
    for name, score in (("t3_focal", "volume"), ("t3_livermax", "livermax")):
        assert f"Patient score: {score};" in (tmp_path / name / "test_report" / "report.md"
                                               ).read_text(), name


def test_ablation_tables_from_metrics(ablation, tmp_path):
    n = len(PATIENT_CODES)
    expected = {}
    for name, seed, pred in (("t2_ifm", 1, [True] * n), ("t3_sam", 2, [True, False] * (n // 2)),
                             ("delayed", 3, [False, True] * (n // 2)),
                             ("t3_pooled", 4, [True] * n), ("t4_early", 5, [False] * n)):
        expected[name] = _write_fake_metrics(tmp_path / name, seed, pred)
    out = tmp_path / "tables" / "abl.md"
    assert ablation.main(["--root", str(tmp_path), "--base", "smoke", "--tables-only",
                          "--out", str(out)]) == 0
    md = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    for name, (truth, scores, dice) in expected.items():
        aucs = _expected_aucs(truth, scores)
        got = data["rows"][name]["metrics"]
        for c, want in enumerate(aucs):
            assert (got["auc"][LESIONS[c]] is None) == (want is None)
            if want is not None:
                assert got["auc"][LESIONS[c]] == pytest.approx(want)
        assert got["auc8"] == pytest.approx(np.mean([a for a in aucs if a is not None]))
        assert got["lesion_dice"] == pytest.approx(dice)
        row_line = next(l for l in md.splitlines() if f"(`{name}`)" in l) if name != "delayed" \
            else next(l for l in md.splitlines() if l.startswith("| without D"))
        cells = [c.strip() for c in row_line.strip("|").split("|")]
        assert cells[1:9] == ["n/a" if a is None else f"{a:.3f}" for a in aucs]
        assert cells[9] == f"{got['auc8']:.3f}" and cells[11] == f"{dice:.3f}"
    assert data["rows"]["t3_acl"]["status"] == "new" and "| +ACL (`t3_acl`) | not run |" in md
    # Delayed phase: per-class difference with D (t3_sam) minus without (delayed).
    a_with = _expected_aucs(*expected["t3_sam"][:2])
    a_without = _expected_aucs(*expected["delayed"][:2])
    for c, name in enumerate(LESIONS):
        want = None if a_with[c] is None else a_with[c] - a_without[c]
        assert data["delayed"]["auc"][name] == (None if want is None else pytest.approx(want))
    diff_line = next(l for l in md.splitlines() if l.startswith("| difference"))
    assert "n/a" in diff_line  # calc has no AUC in either run
    assert "Table 2" in md and "Table 3" in md and "Command: `" in md
    # Table 4: the base's row, each run row, then each minus the base.
    assert "| the base (`t3_pooled`) |" in md and "(`t4_sam`) | not run |" in md
    early = [l for l in md.splitlines() if "(`t4_early`)" in l]
    assert len(early) == 2  # its row, and its difference from the base
    cells = [c.strip() for c in early[1].strip("|").split("|")]
    base, row = data["rows"]["t3_pooled"]["metrics"], data["rows"]["t4_early"]["metrics"]
    assert cells[9] == f"{row['auc8'] - base['auc8']:.3f}"
    assert cells[11] == f"{row['lesion_dice'] - base['lesion_dice']:.3f}"


def test_without_delayed_cache(ablation, tmp_path):
    from lidia_jax.data import preprocessing

    case = tmp_path / "c1"
    case.mkdir()
    image = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.save(case / "image.npy", image)
    np.save(case / "seg.npy", np.ones((2, 3, 4), np.uint8))
    np.save(case / "inst.npy", np.zeros((2, 3, 4), np.uint16))
    (case / "meta.json").write_text(json.dumps({"case": "c1", "phase_mask": [1, 1, 1, 1]}))
    (tmp_path / "plan.json").write_text(json.dumps(
        {"fingerprint": "x", "splits": {"train": [], "val": [], "test": ["c1"]}}))
    view = ablation.WithoutDelayed(preprocessing.Cache(tmp_path))
    data = view.load("c1")
    assert view.case_names("test") == ["c1"]
    np.testing.assert_array_equal(data["image"][..., :3], image[..., :3])
    assert not data["image"][..., 3].any()
    assert data["meta"]["phase_mask"] == [True, True, True, False]
    np.testing.assert_array_equal(np.load(case / "image.npy"), image)  # cache untouched
    assert data["seg"].shape == (2, 3, 4)


def test_benchmark_args_and_markdown(benchmark):
    args = benchmark.parse_args(["--quick"])
    assert (args.repeats, args.warmup, args.configs, args.shapes) == (1, 1, ["smoke"],
                                                                      ["20,40,40"])
    assert benchmark.plan_items(args, "cpu")[0] == ("train", "smoke")
    full = benchmark.parse_args([])
    assert [s for _, s in benchmark.plan_items(full, "gpu") if _ == "train"] == [
        "smoke", "demo", "paper"]
    assert [s for _, s in benchmark.plan_items(full, "cpu") if _ == "train"] == ["smoke", "demo"]
    for bad in (["--shapes", "1,2"], ["--shapes", "a,b,c"], ["--repeats", "0"],
                ["--hungarian-targets", "51"], ["--only", "nope"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)
    env = {"date_utc": "d", "command": "c", "git_commit": "g", "backend": "cpu",
           "devices": ["cpu:0 cpu"], "cpu_model": "m", "cpu_count": 2, "load_average": [1.0],
           "jax": "j", "jaxlib": "j", "python": "p"}
    results = {"environment": env, "repeats": 3, "warmup": 1,
               "train": [{"config": "smoke", "patch": [16, 32, 32], "batch": 2, "params": 1234,
                          "step_s": 0.5, "samples_per_s": 4.0, "first_step_s": 9.0,
                          "peak_device_bytes": None, "peak_rss_bytes": 2**31},
                         {"config": "demo", "error": "child exited 1: boom"}],
               "unet": {"skipped": "torch not installed (pip install -e .[bench])"},
               "inference": [{"shape": [60, 90, 110], "config": "demo", "patch": [32, 64, 64],
                              "tile_batch": 2, "tiles": 27, "estimated": True, "case_s": 10.0,
                              "voxels_per_s": 59400.0, "network_s": 8.0,
                              "seconds_per_tile_batch": 0.5, "peak_device_bytes": None,
                              "peak_rss_bytes": 2**30}]}
    md = benchmark.markdown(results)
    assert "| smoke | 16x32x32 | 2 | 1,234 | 0.500 | 4.00 | 9.0 | n/a | 2.00 |" in md
    assert "| demo | error: child exited 1: boom |" in md
    assert "Skipped: torch not installed" in md
    assert "load average [1.0]); GLIBC_TUNABLES unset" in md  # an environment of before 12-06
    env["glibc_tunables"] = "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES glibc.malloc.hugetlb=1" in benchmark.markdown(results)
    results["unet"] = {"cases": [{"case": "unet", "patch": [16, 32, 32], "batch": 2,
                                  "features": [16, 32], "dtype": "float32",
                                  "times": {"jax_unet_xla": {"median_s": 0.3, "first_s": 20.0},
                                            "torch_plainconvunet": {"median_s": 0.2,
                                                                    "first_s": 1.0}},
                                  "ratio_to_torch": {"jax_unet_xla": 1.5}}],
                       "peak_device_bytes": None, "peak_rss_bytes": 2**30}
    md = benchmark.markdown(results)
    assert "| jax_unet_xla | 0.300 | 20.0 | 1.50 |" in md
    assert "| torch_plainconvunet | 0.200 | 1.0 | 1.00 |" in md
    assert "| 60x90x110 | 27 | 10.00 | 5.94e+04 | 8.00 | 0.5000 | n/a | 1.00 | estimated" in md


def test_benchmark_unet_markdown():
    """benchmark_unet's markdown (no torch needed): its table, and the malloc setting it ran on."""
    bench_unet = _load_script("benchmark_unet")
    env = {"jax": "j", "backend": "cpu", "jax_devices": ["cpu"], "auto_impl": "planes",
           "torch": "t", "torch_device": "cpu", "torch_threads": 2, "cpus": 2,
           "load_avg": (1.0, 1.0, 1.0), "XLA_FLAGS": "", "GLIBC_TUNABLES": None}
    case = {"case": "unet", "features": [16, 32], "patch": [32, 64, 64], "batch": 2,
            "dtype": "float32",
            "times": {"jax_unet_planes": {"median_s": 1.2, "runs_s": [1.2, 1.3], "first_s": 12.0},
                      "torch_plainconvunet": {"median_s": 1.3, "runs_s": [1.3], "first_s": 1.0}},
            "ratio_to_torch": {"jax_unet_planes": 1.2 / 1.3},
            "best_ratio_to_torch": {"jax_unet_planes": 0.92}}
    md = bench_unet.markdown({"environment": env, "cases": [case]})
    assert "| jax_unet_planes | 1.200 | 1.20, 1.30 | 12.0 | 0.92 | 0.92 |" in md
    assert "| torch_plainconvunet | 1.300 | 1.30 | 1.0 | 1.00 | 1.00 |" in md
    assert "XLA_FLAGS='', GLIBC_TUNABLES unset" in md
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES glibc.malloc.hugetlb=1" in bench_unet.markdown(
        {"environment": env, "cases": [case]})


def test_benchmark_quick_hungarian(benchmark, tmp_path):
    """One real figure end to end (in-process): JSON + markdown with positive times."""
    rc = benchmark.main(["--quick", "--only", "hungarian", "--hungarian-targets", "1", "3",
                         "--no-isolate", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "benchmark.json").read_text())
    rows = data["hungarian"]["rows"]
    assert [r["targets"] for r in rows] == [1, 3]
    for r in rows:
        for key in ("jax_single_us", "jax_vmap2_us", "scipy_single_us", "scipy_batch2_us"):
            assert r[key] > 0
    assert data["environment"]["backend"] == "cpu" and data["environment"]["devices"]
    md = (tmp_path / "benchmark.md").read_text()
    assert "| 50 x 3 |" in md and "Backend: cpu" in md


@pytest.fixture(scope="module")
def oracle():
    return _load_script("oracle_baseline")


def test_oracle_baseline_separable_cache(oracle, tmp_path):
    """Classes planted in the arterial intensity: the oracle must score them perfectly."""
    fp = tmp_path / "fp"
    rng = np.random.default_rng(1)
    splits = {"train": [], "val": [], "test": []}
    for i in range(40):
        seg = np.ones((8, 12, 12), np.uint8)
        inst = np.zeros_like(seg, np.uint16)
        image = rng.normal(scale=0.1, size=seg.shape + (4,)).astype(np.float32)
        for j, (z, y) in enumerate([(1, 1), (4, 6)]):
            code = 2 + (i + 3 * j) % 8
            box = (slice(z, z + 3), slice(y, y + 4), slice(2, 6))
            seg[box], inst[box] = code, j + 1
            image[box + (1,)] += code  # phase A tells the class
        folder = fp / f"c{i:02d}"
        folder.mkdir(parents=True)
        np.save(folder / "image.npy", image)
        np.save(folder / "seg.npy", seg)
        np.save(folder / "inst.npy", inst)
        (folder / "meta.json").write_text(json.dumps({"phase_mask": [True] * 4,
                                                      "spacing": [1.0, 1.0, 1.0]}))
        splits["test" if i >= 32 else "val" if i >= 30 else "train"].append(folder.name)
    (fp / "plan.json").write_text(json.dumps({"fingerprint": "fp", "splits": splits}))
    out = tmp_path / "oracle.md"
    oracle.main(["--cache", str(fp), "--out", str(out)])
    table = out.read_text().splitlines()[-1].strip("| ").split(" | ")
    # 8 classes + AUC-8, AUC-2, lesion accuracy, sensitivity, precision. Every class and group
    # occurs in the test split (cases 32-39 hold codes 2-9 twice over): every AUC is defined, 1.
    assert table[0] == "true lesion masks" and [float(v) for v in table[1:]] == [1.0] * 13
    # --workdir finds the same cache through the run's config.json (data.cache_dir set).
    work = tmp_path / "work"
    work.mkdir()
    (work / "plan.json").write_text((fp / "plan.json").read_text())
    (work / "config.json").write_text(json.dumps({"data": {"cache_dir": str(tmp_path)}}))
    out2 = tmp_path / "oracle_workdir.md"
    oracle.main(["--workdir", str(work), "--out", str(out2)])
    assert out2.read_text().splitlines()[-1] == out.read_text().splitlines()[-1]

    # --predicted's rows, with a "model" whose tiles read the class off phase A as planted: its
    # lesions are the true ones, so the forest and the model both score every figure 1.
    def tile_fn(tiles, phase_mask):
        code = np.where(tiles[..., 1] > 1.5, np.clip(np.rint(tiles[..., 1]), 2, 9), 1)
        return np.eye(10, dtype=np.float32)[code.astype(int)], None

    cache = oracle.preprocessing.Cache(fp)
    features = oracle.lesion_forest.lesion_features
    test = [(c, np.load(fp / c / "seg.npy"), np.load(fp / c / "inst.npy"))
            + features(np.load(fp / c / "image.npy"), np.load(fp / c / "seg.npy"),
                       np.load(fp / c / "inst.npy")) for c in splits["test"]]
    train = [features(np.load(fp / c / "image.npy"), np.load(fp / c / "seg.npy"),
                      np.load(fp / c / "inst.npy")) for c in splits["train"]]
    forest = oracle.lesion_forest.fit(np.concatenate([t[2] for t in train]),
                                      np.concatenate([t[1] for t in train]), 8, 50, 0)
    cfg = load_config("smoke")
    rows = oracle.predicted_rows(cfg, tile_fn, cache, test, forest.probabilities,
                                 list(cfg.data.labels[2:]), cfg)
    for label, records in rows:
        s = oracle.metrics.summarize(records, cfg.data.labels[2:], cfg.data.malignant,
                                     cfg.data.benign)
        assert [s[k] for k in ("auc8", "auc2", "lesion_accuracy", "lesion_sensitivity",
                               "lesion_precision")] == [1.0] * 5, label


def test_class_probe_reads_the_semantic_score_and_the_best_query():
    """One lesion of class 3 (label code 4): query 0 covers it and says class 3 with p = 0.9,
    query 1 is the liver everywhere. The semantic map gives the lesion 0.9 (label_probabilities:
    the liver's 1 is the region, the lesion's share is its own 0.9); a second lesion, covered by
    no query, scores 0 and its best query (the liver) is wrong."""
    probe = _load_script("class_probe")
    shape, k = (4, 6, 6), 9  # K = 9 classes (liver first) + no-object
    masks = np.zeros((1, 3) + shape, bool)
    masks[0, 0] = True
    masks[0, 1, 1:3, 1:3, 1:3] = True
    masks[0, 2, 0, 4:, 4:] = True
    batch = {"image": np.zeros((1,) + shape + (4,), np.float32),
             "phase_mask": np.ones((1, 4), bool), "masks": masks,
             "classes": np.array([[0, 3, 5]]), "valid": np.ones((1, 3), bool)}
    logits = np.full((1, 2, k + 1), -30.0, np.float32)
    logits[0, 0, 3], logits[0, 0, k] = np.log(0.9), np.log(0.1)
    logits[0, 1, 0] = 0.0
    mask_logits = np.full((1, 2) + shape, -30.0, np.float32)
    mask_logits[0, 0, 1:3, 1:3, 1:3] = 30.0
    mask_logits[0, 1] = 30.0

    def apply(params, image, phase_mask):
        return {"logits": logits[None], "masks": mask_logits[None]}

    rows = probe.probe(apply, None, [batch])
    (score, right, head), = rows[3]
    assert score == pytest.approx(0.9, abs=1e-4) and right and head is None
    (score, right, head), = rows[5]
    assert score == pytest.approx(0.0, abs=1e-4) and not right
    # With the pooled head: its own term of query 0 says class 1, not 3.
    pooled = np.zeros_like(logits)
    pooled[0, 0, 1] = 5.0
    rows = probe.probe(lambda *a: {"logits": logits[None], "masks": mask_logits[None],
                                   "pooled_logits": pooled[None]}, None, [batch])
    (score, right, head), = rows[3]
    assert right and not head
