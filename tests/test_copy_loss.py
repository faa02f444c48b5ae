"""The copy-target loss: which targets count as in-context copies, and the cross-entropy over them."""

import pytest
import torch
import torch.nn.functional as F

from helpers import with_live_weights
from model import AtmaConfig, AtmaForCausalLM
from pretrain.losses import LossWeights, combine_losses, copy_targets


def copies_by_search(ids: list[int], context: int) -> list[bool]:
    """Oracle: target t (= ids[t + 1]) is a copy when ids[t - context + 1 : t + 2] occurred ending earlier."""
    grams = [tuple(ids[t - context + 1 : t + 2]) if t >= context - 1 else None for t in range(len(ids) - 1)]
    return [g is not None and g in grams[:t] for t, g in enumerate(grams)]


@pytest.mark.parametrize("context", [1, 2, 3, 5])
def test_copy_targets_match_a_direct_search(context):
    gen = torch.Generator().manual_seed(context)
    rows = torch.randint(0, 4, (6, 80), generator=gen)  # four symbols: many repeats at every gram length
    rows[0, 40:] = rows[0, :40]  # one row repeats its first half exactly
    mask = copy_targets(rows[:, :-1], rows[:, 1:], context)
    for r in range(rows.shape[0]):
        assert mask[r].tolist() == copies_by_search(rows[r].tolist(), context), r
    assert mask[0, 40 + context :].all()


def test_a_recalled_value_is_a_copy_target_and_its_first_statement_is_not():
    # "key is 4 7 1 ... key is 4 7 1": only the second statement's continuation repeats.
    fact = [11, 12, 13, 4, 7, 1, 9]
    ids = torch.tensor([fact + [20, 21, 22, 23] + fact])
    mask = copy_targets(ids[:, :-1], ids[:, 1:], 3)[0]
    targets = ids[0, 1:]
    copied = targets[mask].tolist()
    assert copied == [4, 7, 1, 9]  # the recalled digits and the full stop, not the key's own first tokens
    assert not mask[: len(fact)].any()


def test_rows_are_independent():
    a = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    both = torch.cat([a, b])
    mask = copy_targets(both[:, :-1], both[:, 1:], 2)
    assert mask[0].any() and not mask[1].any()


def random_model():
    """The tiny model with its zero-initialised tensors drawn at random (distinct logits per token)."""
    torch.manual_seed(0)
    return with_live_weights(AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=64)))


def test_focus_loss_is_the_cross_entropy_over_the_focused_tokens():
    model = random_model()
    ids = torch.randint(0, 64, (2, 30))
    focus = torch.rand(2, 30) < 0.3
    out = model(ids, ids, focus=focus, loss_chunk_tokens=7)  # chunks cut through rows
    logits = model(ids).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1), reduction="none").view(2, 30)
    torch.testing.assert_close(out.loss, ce.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.focus_loss, ce[focus].mean(), rtol=1e-5, atol=1e-6)
    none = model(ids, ids, focus=torch.zeros_like(focus))
    assert none.focus_loss.item() == 0.0
    assert model(ids, ids).focus_loss is None
    with pytest.raises(ValueError, match="focus"):
        model(ids, None, focus=focus)
    # The copy term enters the total with its weight.
    total = combine_losses({"lm": out.loss, "copy": out.focus_loss}, LossWeights(lm=1.0, copy=2.0))
    torch.testing.assert_close(total, out.loss + 2 * out.focus_loss)


def test_number_tokens_of_a_trained_tokenizer(tiny_shards):
    from tokenizers import Tokenizer

    from data_pipeline.manifest import load_manifest
    from data_pipeline.tokenizer import number_token_ids

    path = load_manifest(tiny_shards).tokenizer_path
    ids = number_token_ids(path)
    tokenizer = Tokenizer.from_file(path)
    assert tokenizer.token_to_id("7") in ids and tokenizer.token_to_id("a") not in ids
    assert all(tokenizer.decode([i]).strip().isdigit() for i in ids)


def test_copy_targets_numbers_keeps_only_the_number_copies():
    from pretrain.config import LossSection
    from pretrain.step import TrainStep

    model = random_model()
    numbers = [40, 41, 42]
    phrase = [10, 11, 12, 13, 40, 42, 41, 9]  # a cue of four word tokens, then a three-digit value
    ids = torch.tensor([phrase + [20, 21, 22] + phrase])
    inputs, labels = ids[:, :-1], ids[:, 1:]
    loss = LossSection(copy_weight=1.0, copy_targets="numbers")
    step = TrainStep(model, grad_accum=1, loss=loss, nan_policy="stop", device=torch.device("cpu"),
                     number_ids=numbers)
    every_copy = copy_targets(inputs, labels, loss.copy_context)
    only_numbers = every_copy & torch.isin(labels, torch.tensor(numbers))
    assert labels[only_numbers].tolist() == [40, 42, 41] and every_copy.sum() > only_numbers.sum()
    expected = model(inputs, labels, focus=only_numbers).focus_loss
    torch.testing.assert_close(step.compute_terms(inputs, labels)["copy"], expected)
    with pytest.raises(Exception, match="no number tokens"):
        TrainStep(model, grad_accum=1, loss=loss, nan_policy="stop", device=torch.device("cpu"), number_ids=[])
