"""train.init_from: a run's weights (and persistent buffers) come from an exported model."""

import pytest
import torch

from helpers import with_live_weights
from model import AtmaConfig, AtmaForCausalLM
from pretrain.config import ConfigError
from pretrain.init_from import load_initial_weights


@pytest.mark.parametrize("core", ["polar", "nope", "rope"])
def test_weights_and_buffers_come_from_the_exported_model(tmp_path, core):
    config = AtmaConfig.from_preset("tiny", vocab_size=64, core=core)
    torch.manual_seed(0)
    source = with_live_weights(AtmaForCausalLM(config))
    if core == "rope":
        assert any("rotary" in name for name, _ in source.named_buffers())  # a buffer the export carries
    source.save_pretrained(str(tmp_path))
    torch.manual_seed(1)
    target = AtmaForCausalLM(config)
    load_initial_weights(target, str(tmp_path), config)
    expected, found = source.state_dict(), target.state_dict()
    assert expected.keys() == found.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=0)


def test_another_model_is_refused_in_one_line(tmp_path):
    AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=64)).save_pretrained(str(tmp_path))
    other = AtmaConfig.from_preset("tiny", vocab_size=64, core="rope")
    with pytest.raises(ConfigError, match="holds another model.*core 'polar' -> 'rope'"):
        load_initial_weights(AtmaForCausalLM(other), str(tmp_path), other)
    with pytest.raises(ConfigError, match="not found"):
        load_initial_weights(AtmaForCausalLM(other), str(tmp_path / "missing"), other)
