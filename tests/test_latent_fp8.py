"""The FP8 latent cache (kv_cache_dtype="fp8", kernels/latent_fp8.py): the entry format's
rounding bounds, the compiled CPU decode kernel reading it exactly as it reads the same entries
dequantized, and the engine serving from it."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from entrypoints.demo import demo_prompts, reference_correct
from kernels import latent_fp8, native
from kernels.mla_decode import paged_mla_decode_ref
from model.demo_checkpoint import default_model_dir
from model.demo_task import is_correct
from tests.cpu_variants import use_variant
from tests.test_cpu_attention import shuffled_with_unwritten_rows, skip_unless_compiled

RANK, ROPE = 512, 64


def quantized(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents whose 128-value groups span twelve orders of magnitude, one group all zeros, one
    with an outlier; rope keys. Returns (latent, rope, entries)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** torch.randint(-6, 6, (tokens, RANK // 128, 1), generator=g).float()
    latent = (torch.randn(tokens, RANK // 128, 128, generator=g) * magnitude).view(tokens, RANK)
    latent[0, :128] = 0
    latent[1, 5] = 3e4
    rope = torch.randn(tokens, ROPE, generator=g) * 7
    return latent, rope, latent_fp8.quantize_entries(latent, rope)


def test_entries_round_within_e4m3_and_dequantize_exactly():
    latent, rope, raw = quantized(300)
    assert raw.shape == (300, 656) and raw.dtype == torch.uint8 and latent_fp8.entry_bytes(RANK, ROPE) == 656
    scales = raw[:, RANK: RANK + 16].contiguous().view(torch.float32)  # [300, 4]
    mant, _ = torch.frexp(scales)
    assert (mant == 0.5).all(), "scales are powers of two"
    amax = latent.view(300, 4, 128).abs().amax(-1)
    live = amax > 0
    ratio = amax[live] / scales[live]
    assert (ratio <= 448).all() and (ratio > 224).all(), "the smallest scale that keeps the group within e4m3"
    out = latent_fp8.dequantize_entries(raw, RANK, torch.float32)
    err = (out[:, :RANK] - latent).abs().view(300, 4, 128)
    x = latent.view(300, 4, 128).abs()
    s = scales[:, :, None]
    # e4m3: 3 mantissa bits (half an ulp: 2^-4 relative) down to 2^-6 * scale, then steps of 2^-9 * scale.
    assert (err <= torch.maximum(x * 2.0 ** -4, s * 2.0 ** -10)).all()
    assert out[0, :128].eq(0).all() and not out.isnan().any()
    assert torch.equal(out[:, RANK:], rope.bfloat16().float()), "rope keys are kept in bf16"
    # value times a power of two has e4m3's 4 significant bits: the bf16 dequantization is exact.
    assert torch.equal(latent_fp8.dequantize_entries(raw, RANK, torch.bfloat16).float(), out)
    # leading dims are kept: a [blocks, page, bytes] cache dequantizes to [blocks, page, 576]
    assert torch.equal(latent_fp8.dequantize_entries(raw.view(3, 100, -1), RANK, torch.float32), out.view(3, 100, -1))


@pytest.mark.parametrize("variant", ["avx512", "amx"])
def test_compiled_gather_equals_the_torch_dequantization(monkeypatch, variant):
    """Prefill reads its contexts' FP8 entries through one compiled gather (bf16, AVX-512)."""
    use_variant(monkeypatch, "decode", variant)
    raw = quantized(640, seed=5)[2].view(10, 64, -1)
    slots = torch.randperm(640)[:333]
    got = native.latent_fp8_gather(raw, slots, RANK, torch.bfloat16)
    assert torch.equal(got, latent_fp8.dequantize_entries(raw.view(-1, 656)[slots], RANK, torch.bfloat16))


@pytest.mark.parametrize("variant", ["generic", "avx512", "amx"])
def test_compiled_write_quantizes_as_torch_does(monkeypatch, variant):
    """The compiled cache write (norm, rope, FP8 quantization in one pass) stores exactly the bytes
    quantize_entries makes of the bf16 entries it writes into a plain cache: 1M latent values over
    eleven orders of magnitude (e4m3 subnormals, round-half-even ties, groups whose largest value
    makes the scale an exact power of two), an all-zero row, shuffled slots, rows left unwritten."""
    use_variant(monkeypatch, "norm", variant)
    from engine.model_config import ModelConfig
    from model.checkpoint_maker import preset_config
    from model.rope import RotaryEmbedding

    cfg = ModelConfig.from_dict(preset_config("small"))
    rope = RotaryEmbedding(cfg, 4096)
    g = torch.Generator().manual_seed(7)
    tokens, heads = 2048, 2
    c_kv = torch.randn(tokens, RANK, generator=g).bfloat16()
    c_kv[3] = 0
    k_pe = torch.randn(tokens, ROPE, generator=g).bfloat16()
    q_pe = torch.randn(tokens, heads, ROPE, generator=g).bfloat16()
    weight = (10.0 ** (torch.rand(RANK, generator=g) * 7 - 5)).bfloat16()
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    slots = torch.randperm(40 * 64, generator=g)[:tokens]
    plain = torch.zeros(40, 64, RANK + ROPE, dtype=torch.bfloat16)
    fp8 = torch.full((40, 64, 656), 0xAB, dtype=torch.uint8)
    q_plain, q_fp8 = q_pe.clone(), q_pe.clone()
    native.mla_cache_entries(c_kv, k_pe, q_plain, weight, 1e-6, rope.rotations, positions, slots, plain)
    native.mla_cache_entries(c_kv, k_pe, q_fp8, weight, 1e-6, rope.rotations, positions, slots, fp8)
    entries = plain.view(-1, RANK + ROPE)[slots]
    expected = latent_fp8.quantize_entries(entries[:, :RANK], entries[:, RANK:])
    got = fp8.view(-1, 656)[slots]
    assert torch.equal(got, expected)
    assert torch.equal(q_fp8, q_plain)
    scales = got[:, RANK: RANK + 16].contiguous().view(torch.float32)
    values = got[:, :RANK]
    assert ((values & 0x78) == 0).logical_and((values & 7) != 0).sum() > 1000, "e4m3 subnormals were made"
    amax = entries[:, :RANK].float().view(tokens, 4, 128).abs().amax(-1)
    assert (amax == 448 * scales).sum() > 10, "groups at the power-of-two edge were seen"
    unwritten = torch.ones(40 * 64, dtype=torch.bool)
    unwritten[slots] = False
    assert (fp8.view(-1, 656)[unwritten] == 0xAB).all()
    # A NaN in a latent (a broken activation) leaves its entry's latents NaN, not finite bytes.
    c_kv[9, 100] = float("nan")
    native.mla_cache_entries(c_kv[9:10], k_pe[9:10], q_pe[9:10], weight, 1e-6, rope.rotations, positions[9:10],
                             slots[9:10], fp8)
    assert latent_fp8.dequantize_entries(fp8.view(-1, 656)[slots[9]], RANK, torch.float32)[:RANK].isnan().all()


def test_latent_width_must_be_whole_scale_groups():
    with pytest.raises(ValueError, match="kv_lora_rank a multiple of 128"):
        latent_fp8.quantize_entries(torch.randn(2, 96), torch.randn(2, 64))


def test_engine_refuses_an_unknown_cache_dtype():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(model_dir="x", kv_cache_dtype="int4")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("impl", ["generic", "avx512", "amx"])
@pytest.mark.parametrize("splits", [1, 3])
def test_compiled_decode_kernel_reads_fp8_entries_as_their_dequantized_values(monkeypatch, dtype, impl, splits):
    """Each implementation on an FP8 cache gives, bit for bit, what it gives on the same entries
    dequantized into a plain cache: ragged lengths, shuffled blocks, unwritten rows of partial
    blocks filled with 0xFF bytes (NaN values and scales), transposed queries and output."""
    skip_unless_compiled(monkeypatch, impl, dtype)
    torch.manual_seed(2)
    page, num_blocks, heads = 16, 60, 16
    raw = quantized(num_blocks * page, seed=3)[2].view(num_blocks, page, -1)
    lens = [1, 16, 17, 50, 130, 200]
    tables, poisoned = shuffled_with_unwritten_rows(raw, lens, 0xFF)
    seq_of_row = torch.tensor(list(range(len(lens))) + [4, 4])  # sequence 4 verifies two more tokens
    kv_lens = torch.tensor(lens + [128, 129])
    rows = len(kv_lens)
    q_latent = torch.randn(heads, rows, RANK).to(dtype).transpose(0, 1)
    q_pe = torch.randn(rows, heads, ROPE).to(dtype)
    outs = []
    for cache in (poisoned, latent_fp8.dequantize_entries(poisoned, RANK, dtype)):
        out = torch.full((heads, rows, RANK), float("nan"), dtype=dtype).transpose(0, 1)
        native.paged_mla_decode_cpu(q_latent, q_pe, cache, tables, seq_of_row, kv_lens, 0.06, max(lens),
                                    num_splits=splits, impl=impl, out=out)
        outs.append(out)
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])
    ref = paged_mla_decode_ref(q_latent.float(), q_pe.float(), raw, tables, seq_of_row, kv_lens, 0.06, max(lens))
    assert ((outs[0].float() - ref).norm() / ref.norm()).item() < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_engine_serves_from_an_fp8_cache():
    """The demo model through the engine (MTP drafting included, whose layer has a cache too):
    held-out problems answered as with transformers, in 656 bytes a token per layer."""
    model_dir = default_model_dir()
    held = demo_prompts(model_dir, 160)
    with LLM(model_dir, kv_cache_dtype="fp8", num_speculative_tokens=1, kv_cache_memory=16 << 20) as llm:
        outs = llm.generate([p.prompt for p in held], SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
        ready = llm.engine.ready
    layers = 3  # 2 layers and the MTP module
    assert ready.kv_bytes_per_token == 656 * layers
    assert ready.kv_cache_tokens == (16 << 20) // (656 * layers * 64) * 64
    right = [is_correct(p, o.text) for p, o in zip(held, outs)]
    assert sum(right) / len(held) >= 0.95
    agree = sum(a == b for a, b in zip(reference_correct(model_dir, held), right))
    assert agree >= len(held) - 2, agree
