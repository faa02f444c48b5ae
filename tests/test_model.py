"""The ATMA model: config validation, parameter counts, init, losses, memory scaling, persistence."""

import json
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels.causal_conv.naive import causal_conv1d_naive
from kernels.polar.naive import polar_attention_naive
from model import AtmaConfig, AtmaForCausalLM, CheckpointError
from model.layers import softcap


def tiny(**overrides) -> AtmaForCausalLM:
    torch.manual_seed(0)
    return AtmaForCausalLM(AtmaConfig.from_preset("tiny", **overrides))


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "core,memory,expected",
    [
        ("polar", True, 378_220_864),
        ("nope", True, 378_179_776),
        ("rope", True, 378_155_200),
        ("polar", False, 369_758_464),
        ("nope", False, 369_717_376),
    ],
)
def test_paper_parameter_counts(core, memory, expected):
    with torch.device("meta"):
        model = AtmaForCausalLM(AtmaConfig.from_preset("atma-378m", core=core, memory=memory))
    assert model.num_parameters() == expected


def test_layout_is_LLGL():
    config = AtmaConfig.from_preset("atma-378m")
    assert config.layout == "LLGL LLGL LLGL LLGL"
    assert config.global_layers == [2, 6, 10, 14]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(core="softmax"), "core"),
        (dict(num_key_value_heads=3), "multiple"),
        (dict(head_dim=24), "power of two"),
        (dict(window=0), "window"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(init_scheme="fancy"), "init_scheme"),
        (dict(num_hidden_layers=2), "no global block"),
        (dict(memory="yes"), "memory"),
    ],
)
def test_config_rejects_impossible_settings(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        AtmaConfig.from_preset("tiny", **overrides)


def test_config_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset"):
        AtmaConfig.from_preset("atma-1t")
    with pytest.raises(ValueError, match="unknown AtmaConfig field"):
        AtmaConfig.from_preset("tiny", hidden=3)


def test_config_json_round_trip(tmp_path):
    config = AtmaConfig.from_preset("tiny", core="rope", window=64, memory=False)
    config.save(tmp_path / "config.json")
    assert AtmaConfig.load(str(tmp_path / "config.json")) == config


# ---------------------------------------------------------------------- math pieces
def test_softcap_golden_values():
    z = torch.tensor([-40.0, -10.0, 1.0, 10.0, 40.0], dtype=torch.float64)
    got = softcap(z.double()).double()
    want = torch.tensor([-14.0449376635, -8.3205029434, 0.9977851579, 8.3205029434, 14.0449376635], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_causal_conv_torch_matches_reference():
    torch.manual_seed(1)
    x, w = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(kernels.causal_conv1d(x, w), causal_conv1d_naive(x, w))


def test_rope_frequencies():
    model = tiny(core="rope")
    freq = model.blocks[2].attn.rotary.angular_freq
    d = model.config.head_dim
    assert freq.shape == (d // 2,)
    assert freq[0] == 1.0 and math.isclose(freq[d // 4 - 1].item(), 1 / 1024, rel_tol=1e-6)
    assert torch.all(freq[d // 4 :] == 0)
    assert not hasattr(model.blocks[2].attn, "canon_q")


# ---------------------------------------------------------------------- init and loss
@pytest.mark.parametrize("core", ["polar", "nope", "rope"])
def test_reference_init_loss_is_ln_vocab(core):
    model = tiny(core=core, init_scheme="reference").double()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    loss = model(ids, labels=ids).loss
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 1e-10


def zero_parameters(model) -> set[str]:
    return {name for name, p in model.named_parameters() if torch.count_nonzero(p) == 0}


def expected_zero_init(scheme: str) -> set[str]:
    """The zero-initialised tensors of the tiny preset (layout L L G L), listed by hand (SPEC §2.9)."""
    names = {"proj.weight", "proj.bias", "blocks.2.attn.v_null"}  # LM head; v_null starts at 0 (SPEC §2.6)
    for i in range(4):
        names |= {f"blocks.{i}.mlp.proj.weight", f"blocks.{i}.mlp.proj.bias"}
    for i in (0, 1, 3):
        names |= {f"blocks.{i}.attn.out_proj.weight", f"blocks.{i}.attn.out_proj.bias"}
        if scheme == "reference":  # the reference's substring rule also zeroes the conv blocks' in_proj
            names |= {f"blocks.{i}.attn.in_proj.weight", f"blocks.{i}.attn.in_proj.bias"}
    for module in ("proj", "mu_proj", "mem.proj"):
        names |= {f"blocks.2.attn.{module}.weight", f"blocks.2.attn.{module}.bias"}
    return names


@pytest.mark.parametrize("scheme", ["default", "reference"])
def test_init_zeroes_exactly_the_output_projections(scheme):
    assert zero_parameters(tiny(init_scheme=scheme)) == expected_zero_init(scheme)


def test_parameter_roles_follow_the_owning_module():
    model = tiny()
    roles = model.parameter_roles()
    assert set(roles) == {name for name, _ in model.named_parameters()}
    assert roles["embed.weight"] == "embed" and roles["proj.weight"] == "head" and roles["proj.bias"] == "scalar"
    assert roles["blocks.0.attn.conv.weight"] == "conv" and roles["blocks.2.attn.canon_k.weight"] == "conv"
    assert roles["blocks.2.attn.v_null"] == "matrix" and roles["blocks.2.attn.null_base"] == "scalar"
    assert roles["blocks.0.attn.in_proj.weight"] == "matrix" and roles["blocks.2.attn.mem.proj.weight"] == "matrix"
    # The MLP's output projection shares the LM head's attribute name but not its role.
    assert roles["blocks.1.mlp.proj.weight"] == "matrix"
    assert sum(r == "head" for r in roles.values()) == 1


def conv_block_grads_after_one_step(init_scheme: str) -> list[float]:
    model = tiny(init_scheme=init_scheme)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads = []
        for i, block in enumerate(model.blocks):
            if not block.is_global:
                conv = block.mixer
                weights = [conv.in_proj.weight, conv.conv.weight, conv.out_proj.weight]
                grads.append(sum(w.grad.abs().sum().item() for w in weights))
        opt.step()
    return grads


def test_conv_blocks_learn_with_default_init_and_not_with_reference():
    assert all(g > 0 for g in conv_block_grads_after_one_step("default"))
    assert all(g == 0 for g in conv_block_grads_after_one_step("reference"))


# ---------------------------------------------------------------------- forward / aux outputs
@pytest.mark.parametrize("core", ["polar", "nope", "rope"])
@pytest.mark.parametrize("memory", [True, False])
def test_tiny_forward_backward_T256(core, memory):
    model = tiny(core=core, memory=memory)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    ids = torch.randint(0, model.config.vocab_size, (2, 256))
    out = model(ids, labels=ids, output_hidden_states=True, return_logits=True)
    assert out.logits.shape == (2, 256, model.config.vocab_size) and out.logits.dtype == torch.float32
    assert out.logits.abs().max() < model.config.logit_softcap
    assert len(out.hidden_states) == model.config.num_hidden_layers
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, ce, rtol=1e-5, atol=1e-5)


def test_chunked_loss_equals_unchunked_with_gradients():
    model = tiny()
    with torch.no_grad():
        model.proj.weight.normal_(0, 0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    loss_a = model(ids, labels=ids, loss_chunk_tokens=7).loss
    (ga,) = torch.autograd.grad(loss_a, model.proj.weight)
    loss_b = model(ids, labels=ids, loss_chunk_tokens=10_000).loss
    (gb,) = torch.autograd.grad(loss_b, model.proj.weight)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("core", ["polar", "nope", "rope"])
def test_distractor_loss_only_when_enabled_and_training(core):
    ids = torch.randint(0, 8192, (1, 24))
    off = tiny(core=core)
    assert off(ids).align_loss.item() == 0.0
    on = tiny(core=core, num_random_keys=16)
    out = on(ids)
    assert out.align_loss.item() > 0
    assert out.align_loss.requires_grad
    on.eval()
    assert on(ids).align_loss.item() == 0.0


def test_model_with_streaming_polar_equals_materialised_oracle(monkeypatch):
    model = tiny(window=None).double()
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0 and p.dim() >= 1:
                p.normal_(0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    fast = model(ids).logits
    monkeypatch.setattr(kernels, "polar_attention", polar_attention_naive)
    slow = model(ids).logits
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_activation_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 8192, (2, 32))
    grads = {}
    for policy in ("none", "global", "all"):
        model = tiny()
        with torch.no_grad():
            for p in model.parameters():
                if torch.count_nonzero(p) == 0:
                    p.normal_(0, 0.05)
        model.set_activation_checkpointing(policy)
        model(ids, labels=ids).loss.backward()
        grads[policy] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads["global"], grads["none"])
    torch.testing.assert_close(grads["all"], grads["none"])
    with pytest.raises(ValueError, match="checkpointing"):
        tiny().set_activation_checkpointing("some")


# ---------------------------------------------------------------------- memory scaling
class LargestTensor(TorchDispatchMode):
    """Record the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_intermediate(model, T: int) -> int:
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    with torch.no_grad(), LargestTensor() as mode:
        model.trunk(ids)
    return mode.largest


def test_forward_memory_grows_linearly_in_T():
    model = tiny(vocab_size=512).eval()
    small, large = largest_intermediate(model, 1024), largest_intermediate(model, 4096)
    # Quadratic growth would give a ratio of 16; streaming attention and chunked memory give ~4.
    assert large / small <= 4.5, (small, large)


def test_tiny_forward_at_T4096():
    model = tiny().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 4096))
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------- persistence
def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny(core="rope")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(str(tmp_path))
    loaded = AtmaForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_sharded_save_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path), max_shard_bytes=2_000_000)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) >= 2
    loaded = AtmaForCausalLM.from_pretrained(str(tmp_path))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def one_line_error(directory) -> str:
    with pytest.raises(CheckpointError) as info:
        AtmaForCausalLM.from_pretrained(str(directory))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_errors_name_the_file(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    assert "model.safetensors" in one_line_error(tmp_path)

    model.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "config.json")
    assert "config.json" in one_line_error(tmp_path)

    model.save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "model.safetensors" in one_line_error(tmp_path)

    model.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in one_line_error(tmp_path)

    # Weights from another architecture: the config asks for tensors the file does not have.
    tiny(core="rope").save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["core"] = "polar"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    message = one_line_error(tmp_path)
    assert "model.safetensors" in message and "missing tensors" in message

    assert "not found" in one_line_error(tmp_path / "nowhere")
