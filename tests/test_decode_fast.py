"""The decoding fast path of the model section and sample.py: a KV cache allocated once, positions on the
device, a one-token step that compiles whole, no host reads while generating, streaming in chunks.

On the GPU the step compiles with mode="reduce-overhead" (CUDA graphs). Inductor takes about a minute on
this CPU, so here the step compiles with backend="aot_eager": dynamo must trace it in one graph
(fullgraph=True) and AOTAutograd must keep the in-place cache writes, which is what the CUDA graph needs;
bench/gpu_check.sh times the real thing."""

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
from stage_code import model_namespace  # noqa: E402

from data.tokenizer import EOT, get_tokenizer  # noqa: E402

NS = model_namespace("sample.py")
GPT, GPTConfig, KVCache = NS["GPT"], NS["GPTConfig"], NS["KVCache"]
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)


def tiny_model(arch, seed=0):
    torch.manual_seed(seed)
    extra = dict(qk_norm=True, logit_softcap=15.0) if arch == "llama" else {}
    return GPT(GPTConfig(arch=arch, **TINY, **extra)).eval()


def greedy(model, prompt, n, **kwargs):
    return torch.cat(list(model.generate(prompt, n, temperature=0, **kwargs)), dim=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_and_compiled_steps_give_the_plain_tokens(arch):
    """20 prompt tokens + 24 new ones, batch 2: past block_size 32 the window slides and the cache refills."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(arch)
    prompt = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(1))
    plain = greedy(model, prompt, 24, use_cache=False)
    assert torch.equal(greedy(model, prompt, 24), plain)  # a fresh cache per call

    cache = KVCache(model.config, "cpu", static=True)
    model.decode_step = torch.compile(model.decode_step, fullgraph=True, backend="aot_eager")
    assert torch.equal(greedy(model, prompt, 24, cache=cache), plain)
    addresses = [t.data_ptr() for t in cache.k + cache.v]
    assert torch.equal(greedy(model, prompt, 24, cache=cache), plain)  # a reused cache: refilled, not reallocated
    assert [t.data_ptr() for t in cache.k + cache.v] == addresses
    assert all(t.shape == (2, 2, 32, 32) for t in cache.k + cache.v)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1, f"decode_step compiled {graphs} times: its shapes and guards should never change"
    torch._dynamo.reset()


def test_generate_never_reads_a_tensor_on_the_host(monkeypatch):
    """Reading a GPU tensor on the host waits for the GPU: generate() and sampling must never do it."""
    model = tiny_model("llama")
    prompt = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = greedy(model, prompt, 30)

    def host_read(self, *args):
        raise AssertionError("a tensor was read on the host during generation")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    g = torch.Generator().manual_seed(0)
    tokens = list(model.generate(prompt, 30, temperature=0))  # past block_size: refills included
    list(model.generate(prompt, 8, temperature=0.9, top_k=50, top_p=0.9, generator=g))
    monkeypatch.undo()
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_bf16_weights_decode_with_a_bf16_cache():
    model = tiny_model("gpt2").to(torch.bfloat16)
    cache = KVCache(model.config, "cpu")
    prompt = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(3))
    tokens = greedy(model, prompt, 6, cache=cache)
    assert tokens.shape == (1, 6) and cache.k[0].dtype == torch.bfloat16 and int(cache.pos) == 10


def eot_after(model, n):
    """Rig a gpt2-arch model to put <|endoftext|> first from position n on, and far down before it: a large
    position embedding along (+/-) the direction of its tied <|endoftext|> row."""
    with torch.no_grad():
        direction = torch.ones(model.config.n_embd)
        direction[1::2] = -1  # zero mean, so LayerNorm keeps it
        direction /= direction.norm()
        model.transformer.wte.weight[EOT] = 10 * direction
        model.transformer.wpe.weight[:n] = -100 * direction
        model.transformer.wpe.weight[n:] = 100 * direction


def test_sample_streams_in_chunks_and_stops_at_eot(tmp_path):
    """Chunks of 3 tokens, <|endoftext|> in the middle of one: what comes after it is never printed."""
    model = tiny_model("gpt2", seed=4)
    enc = get_tokenizer()
    ids = [EOT, *enc.encode_ordinary("Hello world")]
    eot_after(model, len(ids) - 1 + 7)  # 7 tokens, then <|endoftext|>
    tokens = greedy(model, torch.tensor([ids]), 12, use_cache=False)[0].tolist()
    assert tokens.index(EOT) == 7
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "chat": False, "optimizers": [],
                "config": {"arch": "gpt2"}, "step": 0, "best_val_loss": float("inf")}, run_dir / "ckpt.pt")
    result = subprocess.run([sys.executable, "sample.py", "Hello world", f"--ckpt={run_dir}", "--max_new_tokens=12",
                             "--temperature=0", "--stream_chunk=3", "--device=cpu"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world" + enc.decode(tokens[:7]) + "\n"
