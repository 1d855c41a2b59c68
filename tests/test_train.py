"""train_gpt.py: the model's basic contracts, the optimizer split, and whole runs as a user starts them
(smoke config on shards from real FineWeb-Edu text): metrics, checkpoints, exact resume, DDP, bad input."""

import hashlib
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from data.common import lr_factor
from helpers import REPO_ROOT as ROOT
from helpers import load_model_namespace, metrics, train_records, wait_for_steps

SHARED_DATA = ROOT.parent / "shared" / "data"

NS = load_model_namespace(ROOT / "train_gpt.py")
GPT, GPTConfig = NS["GPT"], NS["GPTConfig"]
TINY = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
ARCHS = ["gpt2", "llama"]


def tiny_model(arch, **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(arch=arch, **{**TINY, **overrides}))


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_loss_is_near_uniform(arch):
    x, y = torch.randint(0, 50304, (2, 4, 32), generator=torch.Generator().manual_seed(1))
    _, loss = tiny_model(arch)(x, y)  # y independent of x: a tied head would otherwise favour the input token
    assert abs(loss.item() - math.log(50304)) < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(arch):
    model = tiny_model(arch, vocab_size=512)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 512
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_receives_a_gradient(arch):
    model = tiny_model(arch, vocab_size=512)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_overfits_one_batch(arch, optimizer):
    model = tiny_model(arch, vocab_size=512)
    x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    opts = model.configure_optimizers(optimizer, 1e-2, 0.0, 0.05, 0.95, 0.0, (0.9, 0.95))
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert loss.item() < 0.5


def test_lr_schedules():
    cosine = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(101)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == 1.0 and cosine[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[9:-1], cosine[10:], strict=True))  # never rises after warmup
    wsd = [lr_factor(s, 100, 10, "wsd", 0.0, decay_frac=0.2) for s in range(101)]
    assert wsd[10:81] == [1.0] * 71 and wsd[90] == pytest.approx(0.5) and wsd[100] == 0.0


def test_ignored_targets_give_zero_loss_not_nan():
    model = tiny_model("gpt2", vocab_size=512)
    x = torch.randint(0, 512, (2, 8))
    _, loss = model(x, torch.full_like(x, -1))
    assert loss.item() == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_muon_takes_the_block_matrices_and_adamw_the_rest(arch):
    model = tiny_model(arch)
    named = dict(model.named_parameters())
    adamw, muon = model.configure_optimizers("muon", 1e-3, 0.1, 0.02, 0.95, 0.0, (0.9, 0.95))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    block_matrices = {n for n, p in named.items() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {n for n, p in named.items() if any(p is q for q in muon.param_groups[0]["params"])} == block_matrices
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in block_matrices)
    decayed, plain = adamw.param_groups
    names = lambda group: {n for n, p in named.items() if any(p is q for q in group["params"])}  # noqa: E731
    embeddings = {"transformer.wte.weight"} | ({"transformer.wpe.weight"} if arch == "gpt2" else {"lm_head.weight"})
    assert names(decayed) == embeddings and decayed["weight_decay"] == 0.1
    assert names(plain) == {n for n, p in named.items() if p.dim() == 1} and plain["weight_decay"] == 0.0
    (only,) = model.configure_optimizers("adamw", 1e-3, 0.1, 0.02, 0.95, 0.0, (0.9, 0.95))
    assert sum(len(g["params"]) for g in only.param_groups) == len(named)


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "data/fineweb_edu.py", "--source",
                    str(SHARED_DATA / "fineweb_edu" / "fineweb_edu_sample10BT_head150.jsonl"), "--out_dir", str(out),
                    "--val_fraction", "0.1", "--seed", "0", "--num_proc", "1"], cwd=ROOT, check=True,
                   capture_output=True)
    return out


def train_cmd(shards, out_dir, *args):
    return [sys.executable, "train_gpt.py", "configs/smoke.toml", f"--data_dir={shards}", f"--out_dir={out_dir}",
            "--device=cpu", "--compile=False", "--sample_interval=0", "--eval_interval=1000", *args]


def train(shards, out_dir, *args, check=True):
    result = subprocess.run(train_cmd(shards, out_dir, *args), cwd=ROOT, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_smoke_run_writes_metrics_logs_and_a_weights_only_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    hellaswag = SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl"
    train(shards, out, "--max_iters=6", "--eval_interval=3", "--sample_interval=3", "--hellaswag_interval=3",
          f"--hellaswag_file={hellaswag}", "--hellaswag_limit=8")
    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert set(steps[0]) >= {"loss", "lr", "grad_norm", "param_norm", "tokens_per_sec", "mfu"}
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert [r["step"] for r in records if 0 <= r.get("hellaswag", -1) <= 1] == [3, 6]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["chat"] is False and ckpt["model_config"]["arch"] == "gpt2"
    assert ckpt["loader"]["position"] == 6 * 2  # 2 micro-batches per step in the smoke config
    log = (out / "log.txt").read_text()
    assert "torch " + torch.__version__ in log and "step 3 sample: Once upon a time" in log
    assert (out / "train_gpt.py").read_text() == (ROOT / "train_gpt.py").read_text()
    assert json.loads((out / "config.json").read_text())["max_iters"] == 6


def test_resume_continues_bitwise_after_a_shorter_run_and_after_sigint(shards, tmp_path):
    schedule = "--lr_decay_iters=8"  # the same LR schedule for the short run and the full one
    train(shards, tmp_path / "full", "--max_iters=8", schedule)
    expected = train_records(tmp_path / "full")

    train(shards, tmp_path / "short", "--max_iters=3", schedule)
    # a bare resume: the run's saved settings, not the script's defaults, fill in what is not given
    subprocess.run([sys.executable, "train_gpt.py", f"--out_dir={tmp_path / 'short'}", "--init_from=resume",
                    "--max_iters=8"], cwd=ROOT, check=True, capture_output=True)
    assert train_records(tmp_path / "short") == expected

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(train_cmd(shards, out, "--max_iters=10000", schedule), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    stopped = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 2 <= stopped < 8
    train(shards, out, "--max_iters=8", schedule, "--init_from=resume")
    assert train_records(out) == expected


def test_two_rank_ddp_matches_one_rank_with_twice_the_accumulation(shards, tmp_path):
    train(shards, tmp_path / "one", "--max_iters=1")
    cmd = train_cmd(shards, tmp_path / "two", "--max_iters=1")
    cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (one,), (two,) = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert one[1] == pytest.approx(two[1], rel=1e-6) and one[2] == pytest.approx(two[2], rel=1e-5)  # loss, grad norm
    torch.manual_seed(1337)  # the script's seed: the weights both runs started from
    start = GPT(GPTConfig(arch="gpt2", block_size=64, n_layer=2, n_head=2, n_embd=64)).state_dict()
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        if name.startswith("transformer.h.") and a[name].dim() == 2:
            # Muon orthogonalises in bf16, so the two updates agree to bf16 precision, not fp32
            diff = (a[name] - b[name]).norm() / (a[name] - start[name]).norm()
            assert diff < 0.05, name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)  # 1% of a step


def test_nonfinite_loss_stops_without_touching_the_good_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    train(shards, out, "--max_iters=2")
    before = hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest()
    result = train(shards, out, "--init_from=resume", "--max_iters=50", "--learning_rate=inf", "--muon_lr=inf",
                   "--checkpoint_interval=1", check=False)
    assert result.returncode != 0
    assert "last good checkpoint" in result.stdout
    assert hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest() == before


@pytest.mark.parametrize("args, message", [
    (["--n_layr=3"], "unknown setting 'n_layr' (did you mean n_layer?)"),
    (["--n_layer=two"], "n_layer must be int"),
    (["--total_batch_size=1000"], "must be a multiple of batch_size * block_size"),
    (["--data_dir=/nonexistent"], "python data/fineweb_edu.py --out_dir /nonexistent"),
    (["--init_from=resume"], "not found"),
])
def test_bad_settings_are_one_line_errors(shards, tmp_path, args, message):
    result = train(shards, tmp_path / "run", *args, check=False)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bench_mode_prints_throughput_without_data(tmp_path):
    result = train(tmp_path / "no_data", tmp_path / "run", "--bench=True", "--bench_steps=2", "--total_batch_size=256")
    assert "tokens/s" in result.stdout and not (tmp_path / "run").exists()
