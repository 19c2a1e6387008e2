"""`refusalkit run --quick` end to end on tiny models of other architectures (issue 16), saved to disk
with a chat template: Jamba, a hybrid of state-space and attention layers whose MLPs alternate with
mixtures of experts (Qwen2-MoE's shared expert and the other families are covered operation by
operation in tests/models/test_architectures.py and tests/compress/test_experts.py). Every stage runs — extraction and selection,
Wanda calibrated per expert, comparison with noise floors, evaluation, the repair search with AIRD on
every expert of the edited block, the report — and the repaired checkpoint reloads with the edit."""

from __future__ import annotations

import pytest
import torch

from refusalkit.cli import main
from refusalkit.core import artifacts

from conftest import CHATML_TEMPLATE
from families import TINY_RUN, make

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", ["jamba"])
def test_run_quick_on_a_tiny_model_of_another_architecture(family, tokenizer, tmp_path, capsys, one_thread):
    from refusalkit.models.loading import load_model
    from refusalkit.models.structure import decoder_layers

    model_dir = tmp_path / "model"
    with one_thread():
        make(family, tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    template = tmp_path / "chat.jinja"
    template.write_text(CHATML_TEMPLATE)
    root = tmp_path / "run"
    sets = [x for k, v in TINY_RUN.items() for x in ("--set", f"{k}={v}")]
    args = ["-q", "run", "--run", str(root), "--model", str(model_dir), "--set", f"chat_template={template}",
            "--quick", *sets]  # fmt: skip
    with one_thread():
        code = main(args)
    assert code == 0, capsys.readouterr().err
    comp = artifacts.read_json(root / "wanda-0.5" / "compression.json")
    tensors = comp["experts"]["tensors"]
    assert tensors and all(sum(t["tokens"]) > 0 for t in tensors.values())
    repaired = [p.name for p in root.iterdir() if p.name.startswith("wanda-0.5+")]
    assert repaired, sorted(p.name for p in root.iterdir())
    rep = artifacts.read_json(root / repaired[0] / "repair.json")
    block = rep["layer"]
    edited = {m["module"] for m in rep["matrices"].values()}
    assert set(rep["gain"]) <= {"attn_out", "mlp_down"} and edited
    # the repaired checkpoint is the variant with exactly the recorded edit, on every expert
    from refusalkit.repair.aird import apply_aird

    direction = artifacts.load_tensors(root / "base" / "direction" / "direction.safetensors")["direction"]
    with one_thread():
        var = load_model(str(root / "wanda-0.5" / "model"), chat_template=str(template)).model
        rmodel = load_model(str(root / repaired[0] / "model"), chat_template=str(template)).model
    before = {n: p.clone() for n, p in var.named_parameters()}
    apply_aird(var, direction, block, alphas=rep["alphas"], unit=True, keep_zeros=rep["sparsity_preserving"])
    expected = dict(var.named_parameters())
    changed = set()
    for n, p in rmodel.named_parameters():
        torch.testing.assert_close(p, expected[n], atol=1e-6, rtol=0)
        if not torch.equal(p, before[n]):
            changed.add(n)
    prefix = next(n for n, m in rmodel.named_modules() if m is decoder_layers(rmodel)[block]) + "."
    writers = {(m.split("[")[0] if m.endswith("]") else m + ".weight") for m in edited}
    assert changed == writers and any("experts" in n for n in changed), (changed, writers)
    assert all(n.startswith(prefix) for n in changed)
    report = (root / "report.md").read_text()
    assert "wanda-0.5" in report
