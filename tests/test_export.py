"""`rbvl export CHECKPOINT --merge OUT`: a standalone model whose logits equal the adapter's."""

import subprocess
import sys

import torch
from test_model import batch
from transformers import AutoModelForImageTextToText, AutoProcessor

from rbvl.config import dump_config, load_config
from rbvl.model import apply_lora, load_model


def fake_checkpoint(path):
    cfg = load_config("recipes/demo_tiny_rnb.yaml", ["lora.lora_dropout=0.0"])
    model, processor = load_model(cfg.model, seed=cfg.seed)
    model = apply_lora(model, cfg.lora)
    with torch.no_grad():  # as if trained: adapters and the modules_to_save copies move
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    dump_config(cfg, path / "config.yaml")
    return model.eval(), processor


def test_merged_logits_equal_adapter_logits(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-7"
    model, processor = fake_checkpoint(ckpt)
    inputs = batch(processor)
    inputs.pop("labels")
    with torch.no_grad():
        expected = model(**inputs).logits

    r = subprocess.run(
        [sys.executable, "-m", "rbvl.cli", "export", str(ckpt), "--merge", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)

    proc = AutoProcessor.from_pretrained(tmp_path / "merged")
    prompt = proc.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True)
    out = merged.generate(**proc(text=[prompt], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1

    again = subprocess.run(
        [sys.executable, "-m", "rbvl.cli", "export", str(ckpt), "--merge", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
    )
    assert (
        again.returncode != 0
        and "not empty: export into a new or empty folder" in again.stderr
        and again.stderr.count("\n") == 1
    )


def test_push_to_hub_uploads_the_merged_folder_and_a_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """No network in tests: the Hub API is replaced by a recorder, so what is checked is the call rbvl makes."""
    from huggingface_hub import HfApi

    from rbvl import cli

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://huggingface.co/{repo_id}")  # fmt: skip
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    ckpt = tmp_path / "run" / "checkpoint-3"
    fake_checkpoint(ckpt)
    out = tmp_path / "merged"
    code = cli.main(["export", str(ckpt), "--merge", str(out), "--push-to-hub", "me/tiny-rnb", "--private"])
    assert code == 0
    assert calls[0] == ("create", "me/tiny-rnb", {"repo_type": "model", "private": True, "exist_ok": True})
    assert (
        calls[1][0] == "upload" and calls[1][1]["folder_path"] == str(out) and calls[1][1]["repo_id"] == "me/tiny-rnb"
    )
    assert "pushed to https://huggingface.co/me/tiny-rnb" in capsys.readouterr().out

    def refuse(self, **kw):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    code = cli.main(["export", str(ckpt), "--merge", str(tmp_path / "again"), "--push-to-hub", "me/tiny-rnb"])
    (err,) = [line for line in capsys.readouterr().err.splitlines() if ": error:" in line]
    assert code == 2
    assert err.startswith("rbvl: error: --push-to-hub me/tiny-rnb: PermissionError: 401 Unauthorized")
    assert (tmp_path / "again" / "config.json").exists(), "the local folder is kept"


def test_a_run_folder_exports_its_newest_checkpoint_and_a_full_fine_tune_is_copied(tmp_path):
    """`rbvl export RUN_DIR` was refused while `rbvl eval RUN_DIR` took the newest checkpoint; a lora.enabled=false
    checkpoint was called 'no LoRA adapter ... is it RUN_DIR/checkpoint-N?' although it is one, and a model already."""
    from rbvl.model.export import export_merged
    from rbvl.train.checkpoint import STATE

    run = tmp_path / "run"
    model, processor = fake_checkpoint(run / "checkpoint-7")
    (run / "checkpoint-7" / STATE).write_bytes(b"")  # what makes it a finished checkpoint for `latest`
    (run / "checkpoint-3").mkdir()  # an older one, and one without its state (unfinished) are passed over
    export_merged(run, tmp_path / "merged")
    inputs = batch(processor)
    inputs.pop("labels")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)

    full = tmp_path / "full" / "checkpoint-2"  # lora.enabled=false: the checkpoint is the model
    merged.save_pretrained(full)
    processor.save_pretrained(full)
    (full / "config.yaml").write_text("seed: 0\n")
    (full / STATE).write_bytes(b"")
    export_merged(full, tmp_path / "copied")
    names = {p.name for p in (tmp_path / "copied").iterdir()}
    assert "config.json" in names and "config.yaml" not in names and STATE not in names
    copied = AutoModelForImageTextToText.from_pretrained(tmp_path / "copied").eval()
    with torch.no_grad():
        torch.testing.assert_close(copied(**inputs).logits, merged(**inputs).logits, rtol=0, atol=0)
