"""int8 judged on the CPU that will run it: `options.isa` of the x86 CPU targets. On a host with more than
the deployment ISA the bundle is judged under qemu-x86_64 (AVX2: `-cpu Haswell`, its int8 numerics exactly);
a bundle within budget on the host but not on the deployment ISA is not shipped complete."""

from __future__ import annotations

import pytest
import yaml

from edgebundle.core.isa import exceeds, has_vnni, how_to_judge, host_isa, isa_of, qemu
from edgebundle.core.recipe import load_recipe
from edgebundle.pipeline.runner import run

EMULATES_AVX2 = exceeds(host_isa(), "avx2") and qemu() is not None


def test_isa_classes_and_how_each_is_judged_here():
    assert isa_of({"avx2", "avx512f", "avx512_vnni"}) == "avx512-vnni"
    assert isa_of({"avx2", "avx512f"}) == "avx512"
    assert isa_of({"avx2", "avx_vnni"}) == "avx-vnni"
    assert isa_of({"avx2"}) == "avx2" and isa_of({"asimd"}) == "other"
    assert [h for h in ("avx2", "avx-vnni", "avx512", "avx512-vnni", "other") if exceeds(h, "avx2")] == [
        "avx-vnni", "avx512", "avx512-vnni"]
    assert exceeds("avx512-vnni", "avx512") and not exceeds("avx512", "avx512-vnni")
    assert how_to_judge("host")[0] == "native"
    mode, model, why = how_to_judge("avx2")
    if host_isa() == "avx2":
        assert mode == "native"
    elif EMULATES_AVX2:
        assert (mode, model) == ("emulated", "Haswell") and "qemu-x86_64 -cpu Haswell" in why
    if host_isa() != "avx512-vnni":  # AVX-512 cannot be emulated: judged on the host's ISA, said so
        mode, _, why = how_to_judge("avx512-vnni")
        assert mode == "host" and "judged on" in why
    if host_isa() == "avx512-vnni":  # oneDNN's kernels (OpenVINO) can be capped where QEMU has no AVX-512
        assert how_to_judge("avx512", "onednn")[:2] == ("capped", "AVX512_CORE")
        assert how_to_judge("avx2", "onednn")[:2] == ("capped", "AVX2")
        assert how_to_judge("avx512")[0] == "host"  # a runtime without a cap: not reproduced


def _recipe(tmp_path, options: dict, min_snr_db: float = 30) -> object:
    d = {"version": 1, "name": "saturating", "model": {"factory": "factories:saturating"},
         "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32", "dynamic_axes": {0: "batch"}}],
         "outputs": ["logits"], "data": {"kind": "digits", "calibration_samples": 64},
         "metric": {"name": "snr", "min_snr_db": min_snr_db},
         "stages": {"train": {"enabled": False}, "prune": {"enabled": False}, "distill": {"enabled": False}},
         "targets": [{"name": "ort-cpu", "measure": {"iterations": 10},
                      "options": {"precision": "int8", "accuracy_control": False, "isa": "avx2", **options}}],
         "output": str(tmp_path / "out")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    return load_recipe(tmp_path / "r.yaml")


@pytest.mark.skipif(not (host_isa() == "avx2" or EMULATES_AVX2),
                    reason=f"AVX2 arithmetic is needed: an AVX2 host, or qemu-x86_64 (apt-get install qemu-user) on a "
                           f"larger x86 host (this one: {host_isa()}, qemu {'found' if qemu() else 'missing'})")
def test_int8_that_holds_on_the_host_but_saturates_on_avx2_is_refused(tmp_path):
    """u8 x s8 with 8-bit weights: AVX2's pairwise multiply-add saturates on bright pixels under large weights
    (measured on an AVX-512 VNNI host: 39.4 dB natively, 15.0 dB under AVX2; with 7-bit weights 37.9 dB on both).
    Built for avx2, it is judged on AVX2 arithmetic (natively on an AVX2 host, under QEMU on a larger one) and
    refused; on a VNNI host the same model was within budget. reduce_range auto (7-bit weights, what the
    deployment ISA needs) holds on AVX2, and computes there what it computes here: its pair sums cannot
    saturate, so it is judged natively (emulating all-MiniLM-L6-v2 took about 1700x native), and the emulated
    outputs show the two agree."""
    res = run(_recipe(tmp_path, {"reduce_range": False}))
    (b,) = res.bundles
    assert b.status == "rejected" and not (tmp_path / "out" / "ort-cpu").exists()
    assert "snr" in b.reason and "(budget: SNR >= 30 dB)" in b.reason
    if EMULATES_AVX2:
        assert "on avx2 (qemu-x86_64 -cpu Haswell; on this host's" in b.reason
        if has_vnni(host_isa()):
            assert "on this host's avx512-vnni: within budget" in b.reason or "avx-vnni: within budget" in b.reason

    res = run(_recipe(tmp_path, {}))
    (b,) = res.bundles
    assert b.status == "complete", b.reason
    isa = b.manifest["accuracy"]["isa"]
    assert isa["deployment"] == "avx2" and isa["build_host"] == host_isa()
    assert b.manifest["quantization"]["reduce_range"] is True
    assert isa["judged_on"] == "native" and ("32640" in isa["how"] or host_isa() == "avx2")
    if EMULATES_AVX2:  # the claim itself: AVX2's outputs are this host's, up to float rounding
        import numpy as np

        from edgebundle.core.data import iter_feeds
        from edgebundle.pipeline.emulated import emulated_outputs
        from edgebundle.targets.ort_cpu import OrtCpuTarget

        prepared, recipe = res.prepared, res.prepared.recipe
        test = prepared.dataset.test
        (emu,) = emulated_outputs("ort-cpu", b.path / "model.onnx", b.manifest["target"]["runtime"], 2, test,
                                  recipe.inputs, "Haswell")
        with OrtCpuTarget().open(b.path / "model.onnx", threads=2, runtime=b.manifest["target"]["runtime"]) as s:
            native = np.concatenate([s.run(f)[0] for f in iter_feeds(test, recipe.inputs, 64)])
        assert np.abs(emu - native).max() <= 1e-5 * np.abs(native).max()


def test_weights_auto_takes_8_bit_uint8_where_7_bit_int8_gives_up_more_for_a_cpu_without_vnni(tmp_path):
    """For AVX2, int8 weights get 7 bits (37.9 dB here); under a budget 7-bit int8 cannot hold with every layer
    int8, weights auto also tries 8-bit uint8 (u8 x u8 kernels: exact on every ISA) and ships the form that
    gives up fewer float layers, judged natively since both compute the same integers everywhere."""
    res = run(_recipe(tmp_path, {}, min_snr_db=38.5))
    (b,) = res.bundles
    assert b.status == "complete", b.reason
    q = b.manifest["quantization"]
    assert q["weights"] == "uint8" and q["reduce_range"] is False and q["weights_auto"]["chose"] == "uint8"
    s8, u8 = q["weights_auto"]["tried"]
    assert s8["weights"] == "int8 (7-bit)" and (not s8["within_budget"] or s8["layers_kept_float"] > 0)
    assert u8["within_budget"] and u8["layers_kept_float"] <= s8["layers_kept_float"]
    isa = b.manifest["accuracy"]["isa"]
    assert isa["judged_on"] == "native" and ("u8 x u8" in isa["how"] or host_isa() == "avx2")
    assert b.manifest["accuracy"]["target"] >= 38.5
    # every point tried, each timed here and marked on the Pareto front; the choice says what it rests on
    ft = q["forms_tried"]
    forms = {p["form"] for p in ft["points"]}
    assert forms == {"static int8, int8 weights (7-bit)", "static int8, uint8 weights"}, forms
    assert all(p["p50_ms"] > 0 for p in ft["points"]) and any(p["pareto"] for p in ft["points"])
    assert ft["chosen"] == "static int8, uint8 weights" and ft["deployment_isa"] == "avx2"
    assert ("not the deployment ISA avx2" in ft["chosen_by"]) == (host_isa() != "avx2")
    from edgebundle.pipeline.report import write_report

    html = write_report(tmp_path / "out").read_text()
    assert "int8 forms tried" in html and "static int8, uint8 weights" in html


CAPS_AVX2 = exceeds(host_isa(), "avx2")


def _ov_recipe(tmp_path, options: dict, precision: str = "int8"):
    r = _recipe(tmp_path, {}, min_snr_db=18)  # OpenVINO's int8 of this MLP: 21 dB on every ISA with the fix
    d = yaml.safe_load((tmp_path / "r.yaml").read_text())
    d["targets"] = [{"name": "openvino", "measure": {"iterations": 10},
                     "options": {"precision": precision, "isa": "avx2", **options}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    return load_recipe(tmp_path / "r.yaml") if r else None


@pytest.mark.skipif(not CAPS_AVX2, reason=f"needs a host with more than AVX2 (this one: {host_isa()})")
def test_openvino_judged_on_avx2_kernels_by_onednn_cap(tmp_path):
    """OpenVINO's CPU plugin runs oneDNN, whose kernels ONEDNN_MAX_CPU_ISA caps at AVX2: the bundle built for avx2
    is judged in a child process under that cap (the outputs qemu-x86_64 -cpu Haswell gives, at native speed).
    Without NNCF's overflow fix the saturating model holds here but not on AVX2 kernels, and is refused; the
    default (overflow fix on every layer where the deployment ISA lacks VNNI) holds there too."""
    pytest.importorskip("openvino")
    res = run(_ov_recipe(tmp_path, {"overflow_fix": "disable"}))
    (b,) = res.bundles
    assert b.status == "rejected" and not (tmp_path / "out" / "openvino").exists()
    assert "on avx2 (ONEDNN_MAX_CPU_ISA=AVX2; on this host's" in b.reason, b.reason
    if has_vnni(host_isa()):  # measured: 21.2 dB on the VNNI host, 14.4 dB on AVX2 kernels
        assert "avx512-vnni: within budget" in b.reason or "avx-vnni: within budget" in b.reason, b.reason

    res = run(_ov_recipe(tmp_path, {}))
    (b,) = res.bundles
    assert b.status == "complete", b.reason
    isa = b.manifest["accuracy"]["isa"]
    assert isa["judged_on"] == "capped" and isa["kernel_cap"] == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert isa["deployment"] == "avx2" and "oneDNN capped at AVX2" in isa["how"]
    assert b.manifest["quantization"]["overflow_fix"].startswith("enable")
    assert b.manifest["accuracy"]["target"] >= 18


@pytest.mark.skipif(not CAPS_AVX2, reason=f"needs a host with more than AVX2 (this one: {host_isa()})")
def test_openvino_precision_auto_times_int8_against_fp32_on_the_capped_kernels(tmp_path):
    """precision auto for a deployment ISA the kernels were capped at: int8 and fp32 are timed interleaved in a
    child under the same cap (AVX2 code on this CPU, said so), and that decision picks what ships."""
    pytest.importorskip("openvino")
    res = run(_ov_recipe(tmp_path, {}, precision="auto"))
    (b,) = res.bundles
    assert b.status == "complete", b.reason
    c = b.manifest["quantization"]["precision_choice"]
    assert c["timed_on"].startswith("avx2 kernels (ONEDNN_MAX_CPU_ISA=AVX2)") and c["rounds"] > 0
    assert c["decided"] in ("faster", "slower", "within band", "undecided")
    assert b.manifest["target"]["precision"] == ("fp32" if c["decided"] == "slower" else "int8")
