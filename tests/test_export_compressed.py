"""Compressed 2:4 weights (compressed-tensors' sparse-24-bitmask) and weight-only quantization."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sparsedist.errors import EvalError
from sparsedist.eval.compress import (
    compress24,
    compress_dir,
    decompress24,
    decompressed_state,
    is_24,
    load_compressed,
)
from sparsedist.eval.quantize import (
    load_quantized,
    pack_int4,
    qmax,
    quantize_weight,
    save_quantized,
    unpack_int4,
)
from sparsedist.sparsity import nm_mask


def random_24(rows: int, cols: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A 2:4 weight with some groups holding fewer than 2 non-zeros and some pruned slots at -0.0."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight = weight * nm_mask(weight)  # pruned slots of negative weights become -0.0
    weight[torch.rand(rows, cols, generator=generator) < 0.1] = 0.0
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_decompress_is_bit_exact(dtype):
    weight = random_24(24, 20, dtype)  # 20 columns: the last bitmask byte is half padding
    parts = compress24(weight)
    assert parts["compressed"].shape == (24, 10) and parts["compressed"].dtype == dtype
    assert parts["bitmask"].shape == (24, 3) and parts["bitmask"].dtype == torch.uint8
    assert parts["shape"].tolist() == [[24], [20]] and parts["shape"].dtype == torch.int64
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    canonical = weight + 0.0  # -0.0 → +0.0: the only bits compression does not keep
    assert torch.equal(decompress24(**parts).view(bits), canonical.view(bits))


def test_bitmask_layout_follows_compressed_tensors():
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    parts = compress24(weight)
    # kept: columns 1, 3 (the non-zeros), then 4 and 5 (the non-zero, then the first zero): bit j of byte 0
    assert parts["bitmask"].tolist() == [[0b00111010]]
    assert parts["compressed"].tolist() == [[1.5, -2.0, 3.0, 0.0]]


def test_int8_codes_compress_too():
    codes = quantize_weight(random_24(8, 16), 8).codes
    assert torch.equal(decompress24(**compress24(codes)), codes)


def test_a_weight_that_is_not_24_is_refused():
    assert not is_24(torch.ones(2, 8))
    with pytest.raises(EvalError, match="not 2:4 sparse"):
        compress24(torch.ones(2, 8))


def micro_llama(path, tie: bool = False):
    """A random micro Llama with 2:4 FFN weights, saved to `path`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".mlp." in name and isinstance(module, torch.nn.Linear):
                module.weight.mul_(nm_mask(module.weight))
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_compressed_directory_rebuilds_the_same_logits(tmp_path, tie):
    dense = micro_llama(tmp_path / "dense", tie)
    sizes = compress_dir(tmp_path / "dense", tmp_path / "compressed")
    ffn = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("down_proj", "gate_proj", "up_proj")]
    assert sorted(sizes) == ffn
    # 80x32 fp32: 40 values a row (4 bytes), 4 bitmask bytes a row, 2 int64 for the shape
    assert sizes["model.layers.0.mlp.up_proj"] == 80 * 16 * 4 + 80 * 4 + 16
    config = json.loads((tmp_path / "compressed" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    sparsity = config["sparsity_config"]
    assert (sparsity["format"], sparsity["sparsity_structure"]) == ("sparse-24-bitmask", "2:4")
    assert sparsity["targets"] == ffn
    assert "lm_head" in sparsity["ignore"] and "model.layers.0.self_attn.q_proj" in sparsity["ignore"]
    with safe_open(tmp_path / "compressed" / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.mlp.down_proj.compressed", "model.layers.1.mlp.down_proj.bitmask",
            "model.layers.1.mlp.down_proj.shape", "model.layers.1.self_attn.q_proj.weight"} <= keys
    assert "model.layers.1.mlp.down_proj.weight" not in keys
    state = decompressed_state(tmp_path / "compressed")
    for name, value in dense.state_dict().items():
        if name in state:
            assert torch.equal(state[name], value), name
    rebuilt = load_compressed(tmp_path / "compressed")
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens).logits, dense(tokens).logits)


def test_compressed_tensors_reads_our_files(tmp_path):
    """Only where compressed-tensors ≤ 0.14 (the last versions with sparse-24-bitmask) is installed."""
    pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask")
    from compressed_tensors.compressors import ModelCompressor

    micro_llama(tmp_path / "dense")
    compress_dir(tmp_path / "dense", tmp_path / "compressed")
    config = json.loads((tmp_path / "compressed" / "config.json").read_text())["quantization_config"]
    ours = decompressed_state(tmp_path / "compressed")
    theirs = dict(ModelCompressor.from_compression_config(config).sparsity_compressor.decompress(
        str(tmp_path / "compressed")))
    assert all(torch.equal(theirs[name], ours[name]) for name in theirs)


def test_compression_refuses_gpt2_and_dense_models(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(EvalError, match="Conv1D"):
        compress_dir(tmp_path / "gpt2", tmp_path / "out")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(EvalError, match="no 2:4 weights"):
        compress_dir(tmp_path / "dense", tmp_path / "out")


def group_scales(q, cols: int) -> torch.Tensor:
    return q.scales.float().repeat_interleave(q.group, dim=1)[:, :cols]


@pytest.mark.parametrize(("bits", "group", "cols"), [(8, 128, 200), (4, 128, 200), (4, 16, 80), (4, 128, 32)])
def test_quantizer_error_is_within_half_a_scale(bits, group, cols):
    weight = torch.randn(48, cols, generator=torch.Generator().manual_seed(bits + cols)) * 0.02
    weight[3] = 0.0  # an all-zero row: the scale floor, codes 0
    weight[5] *= 1e-4  # scales below fp16's normal range are floored there
    q = quantize_weight(weight, bits, group)
    expected_group = cols if bits == 8 else min(group, cols)
    assert q.group == expected_group and q.scales.dtype == torch.float16
    assert q.scales.shape == (48, -(-cols // expected_group))
    assert q.codes.dtype == torch.int8 and int(q.codes.abs().max()) <= qmax(bits)
    error = (weight - q.dequantize()).abs()
    # the bound is s/2; fp32 rounding of w·(1/s) may add a few ulps of the code (≤ 127 · 2^-24 relative)
    assert (error <= group_scales(q, cols) / 2 * (1 + 1e-4)).all()
    assert torch.equal(q.dequantize()[3], torch.zeros(cols))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_keeps_zeros_and_24(bits):
    weight = random_24(32, 64) * 0.02
    dequantized = quantize_weight(weight, bits, 16).dequantize()
    assert ((weight == 0) <= (dequantized == 0)).all()
    assert is_24(dequantized)


@pytest.mark.parametrize(("bits", "group"), [(8, 128), (4, 32)])
def test_torchao_computes_the_reference_codes_and_scales(bits, group):
    pytest.importorskip("torchao.quantization.quant_primitives")
    weight = torch.randn(40, 128, generator=torch.Generator().manual_seed(bits)) * 0.02
    weight[1] = 0.0
    ours = quantize_weight(weight, bits, group, torchao=False)
    theirs = quantize_weight(weight, bits, group, torchao=True)
    assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.scales, theirs.scales)


def test_int4_packing_round_trips():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # an odd column count
    packed = pack_int4(codes)
    assert packed.shape == (3, 8) and packed.dtype == torch.uint8
    assert packed[0, 0] == (0x8 | 0x9 << 4)  # -8 and -7 as 4-bit two's complement, the even column low
    assert torch.equal(unpack_int4(packed, 15), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_file_round_trips(tmp_path, bits):
    quantized = {"sparse": quantize_weight(random_24(16, 48) * 0.02, bits, 16),
                 "dense": quantize_weight(torch.randn(16, 40) * 0.02, bits, 16)}
    sizes = save_quantized(tmp_path / "q.safetensors", quantized, bits, 16)
    code_bytes = {8: 16 * 24, 4: 16 * 12}[bits]  # the 2:4 layer keeps half its codes (int4: two a byte)
    assert sizes["sparse"] == code_bytes + 16 * 6 + quantized["sparse"].scales.nbytes + 16
    loaded = load_quantized(tmp_path / "q.safetensors")
    for name, q in quantized.items():
        assert torch.equal(loaded[name].codes, q.codes) and torch.equal(loaded[name].scales, q.scales)
        assert torch.equal(loaded[name].dequantize(), q.dequantize())
