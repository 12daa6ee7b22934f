"""The chunked loss against transformers' own loss (CPU, tiny models, fp32) and in the estimator."""

from __future__ import annotations

import pytest
import torch

from memtune.config import Adapter, TrainConfig
from memtune.errors import UsageError
from memtune.predict.allocator import simulate
from memtune.predict.estimate import estimate
from memtune.predict.trace import NO_LAYER, Category, extend, trace_step
from memtune.recipe import step as recipe
from memtune.recipe.loss import chunked_causal_lm_loss
from memtune.sources import catalog_config

VOCAB = 300


def tiny(hub_id: str, layers: int = 2):
    """A catalog config shrunk to a few thousand parameters per layer, dropout off."""
    config = catalog_config(hub_id)
    config.vocab_size, config.num_hidden_layers = VOCAB, layers
    if getattr(config, "pad_token_id", None) is not None:
        config.pad_token_id = 0  # Phi-3's 32000 is outside the small vocabulary
    if config.model_type == "gpt2":
        config.n_embd, config.n_head, config.n_positions = 64, 4, 128
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return config
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


def untied_llama(layers: int = 2):
    config = tiny("meta-llama/Llama-3.2-1B", layers)
    config.tie_word_embeddings = False
    return config


MODELS = {
    "llama": untied_llama,
    "gemma2-softcap": lambda: tiny("google/gemma-2-2b"),
    "gpt2-tied": lambda: tiny("gpt2"),
    "qwen2": lambda: tiny("Qwen/Qwen2.5-0.5B"),
    "phi3": lambda: tiny("microsoft/Phi-3-mini-4k-instruct"),
}


def loss_and_gradients(model, compute_loss):
    model.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(model, standard, chunked):
    expected_loss, expected_grads = loss_and_gradients(model, standard)
    loss, grads = loss_and_gradients(model, chunked)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def batch(seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make_config", MODELS.values(), ids=MODELS.keys())
def test_chunked_loss_equals_the_models_own_loss(make_config):
    torch.manual_seed(0)
    config = make_config()
    train_config = TrainConfig(seq_len=24, micro_batch_size=2)
    model = recipe.build_model(config, train_config, "cpu")
    input_ids = batch()
    if config.model_type == "gemma2":
        assert config.final_logit_softcapping  # the chunks must apply it to match
    backbone = getattr(model, model.base_model_prefix)

    def chunked():
        hidden = backbone(input_ids=input_ids).last_hidden_state
        softcap = getattr(config, "final_logit_softcapping", None)
        # 7 tokens per chunk: 48 tokens make 6 full chunks and a ragged one.
        return chunked_causal_lm_loss(hidden, model.get_output_embeddings(), input_ids, chunk_tokens=7, softcap=softcap)

    assert_same_loss_and_gradients(model, lambda: model(input_ids=input_ids, labels=input_ids).loss, chunked)


def test_ignored_labels_and_num_items_in_batch_match_transformers():
    torch.manual_seed(0)
    model = recipe.build_model(untied_llama(), TrainConfig(seq_len=24), "cpu")
    input_ids = batch()
    labels = input_ids.clone()
    labels[0, :10] = -100  # a prompt that is not trained on
    labels[1, 20:] = -100  # padding
    backbone = model.model

    def chunked(**kwargs):
        hidden = backbone(input_ids=input_ids).last_hidden_state
        return chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_tokens=5, **kwargs)

    assert_same_loss_and_gradients(model, lambda: model(input_ids=input_ids, labels=labels).loss, chunked)
    # Gradient accumulation: divide by the label tokens of all micro-batches, as Trainer passes them.
    items = torch.tensor(100)
    assert_same_loss_and_gradients(
        model,
        lambda: model(input_ids=input_ids, labels=labels, num_items_in_batch=items).loss,
        lambda: chunked(num_items_in_batch=items),
    )


@pytest.mark.parametrize(
    "adapter", [Adapter(rank=4), Adapter(kind="prefix", num_virtual_tokens=5)], ids=["lora", "prefix"]
)
def test_forward_loss_matches_standard_through_peft(adapter):
    torch.manual_seed(0)
    standard = TrainConfig(seq_len=300, micro_batch_size=2, adapter=adapter)
    model = recipe.build_model(tiny("meta-llama/Llama-3.2-1B"), standard, "cpu")
    # 600 tokens: two chunks of the default size.
    input_ids = batch(shape=(2, 300))
    assert_same_loss_and_gradients(
        model,
        lambda: recipe.forward_loss(model, input_ids, input_ids, standard),
        lambda: recipe.forward_loss(model, input_ids, input_ids, standard.replace(loss="chunked")),
    )


@pytest.mark.parametrize("model_type, rescaling", [("cohere", {"logit_scale": 0.0625}),
                                                    ("granite", {"logits_scaling": 8.0})])
def test_chunked_loss_rescales_the_logits_as_cohere_and_granite_do(model_type, rescaling):
    """Cohere multiplies its logits by logit_scale and Granite divides them by logits_scaling before the loss: the
    chunks do the same (same loss and gradients as the model's own forward)."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **rescaling)
    standard = TrainConfig(seq_len=24, micro_batch_size=2)
    model = recipe.build_model(config, standard, "cpu")
    input_ids = batch()
    assert_same_loss_and_gradients(
        model,
        lambda: recipe.forward_loss(model, input_ids, input_ids, standard),
        lambda: recipe.forward_loss(model, input_ids, input_ids, standard.replace(loss="chunked")),
    )


def test_chunked_loss_refuses_a_rescaling_it_does_not_know():
    config = tiny("meta-llama/Llama-3.2-1B")
    config.logits_scaling = 8.0  # a Granite field on a Llama config: where would its forward apply it?
    train_config = TrainConfig(seq_len=8, loss="chunked")
    with pytest.raises(UsageError, match="logits_scaling=8.0"):  # when the model is prepared, before any step
        recipe.build_model(config, train_config, "cpu")
    model = recipe.build_model(config, train_config.replace(loss="standard"), "cpu")
    with pytest.raises(UsageError, match="logits_scaling=8.0"):
        recipe.forward_loss(model, batch(shape=(1, 8)), batch(shape=(1, 8)), train_config)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_chunked_trace_extends_and_tags_only_the_head_as_logits(checkpointing):
    def model_config(layers: int):
        # A large vocabulary for the width, as in small LMs: the peak is in the loss's backward.
        config = untied_llama(layers)
        config.vocab_size = 4000
        return config

    config = TrainConfig(seq_len=400, micro_batch_size=2, amp="bf16", gradient_checkpointing=checkpointing,
                         loss="chunked")
    full = trace_step(model_config(6), config, device="cpu")
    extended = extend(trace_step(model_config(3), config, device="cpu"), 6)
    assert len(extended) == len(full.events)
    assert simulate(extended).peak_allocated_bytes == simulate(full.events).peak_allocated_bytes
    logits = [e.num_bytes for e in full.events if e.kind == "alloc" and full.categories[e.source] == Category.LOGITS]
    # The largest logits tensor is one chunk's fp32 logits (512 of the 800 tokens), never all of them.
    assert max(logits) == 512 * 4000 * 4
    # Backward recomputes each chunk's logits; the decoder layers' backward after them is not logits.
    in_layers = {full.categories[e.source] for e in full.events if e.kind == "alloc" and e.layer != NO_LAYER}
    assert Category.LOGITS not in in_layers


def test_estimate_of_chunked_loss_shrinks_the_logits():
    model_config = catalog_config("Qwen/Qwen2.5-0.5B")
    standard = TrainConfig(seq_len=1024, micro_batch_size=4, amp="bf16", gradient_checkpointing=True)
    before = estimate(model_config, standard, device="cpu")
    after = estimate(model_config, standard.replace(loss="chunked"), device="cpu")
    # 4 x 1024 tokens x 151,936 vocabulary: 2.3 GiB per fp32 copy of the logits in the standard loss.
    assert before.breakdown["logits"] > 2 << 30
    assert after.breakdown.get("logits", 0) < before.breakdown["logits"] / 4
    assert after.peak_reserved_bytes < before.peak_reserved_bytes - (4 << 30)


def _standard_and_chunked(model_config, standard: TrainConfig):
    """The same weights built twice through `recipe.build_model`: with the standard loss and with the chunked one
    (prepare_model makes the causal LM's forward chunked before peft wraps it)."""
    torch.manual_seed(0)
    reference = recipe.build_model(model_config, standard, "cpu")
    torch.manual_seed(0)
    chunked = recipe.build_model(model_config, standard.replace(loss="chunked"), "cpu")
    chunked.load_state_dict(reference.state_dict())
    return reference, chunked


@pytest.mark.parametrize(
    "adapter", [None, Adapter(rank=4), Adapter(kind="prefix", num_virtual_tokens=5)], ids=["full", "lora", "prefix"]
)
def test_the_chunked_forward_gives_the_models_loss_and_gradients_through_peft(adapter):
    """`model(input_ids=..., labels=...)` on the model build_model returns: peft's PeftModel -> LoraModel -> the causal
    LM's instance forward (LoRA), or the prompt cache passed on as past_key_values (prefix tuning)."""
    standard = TrainConfig(seq_len=300, micro_batch_size=2, adapter=adapter)
    reference, chunked = _standard_and_chunked(tiny("meta-llama/Llama-3.2-1B"), standard)
    input_ids = batch(shape=(2, 300))  # 600 tokens: two chunks of the default size
    labels = input_ids.clone()
    labels[0, :7] = -100
    reference_output = reference(input_ids=input_ids, labels=labels)
    output = chunked(input_ids=input_ids, labels=labels)
    assert output.logits is None and reference_output.logits is not None  # the chunked forward ran
    expected_loss, expected_grads = loss_and_gradients(reference, lambda: reference(input_ids=input_ids,
                                                                                    labels=labels).loss)
    loss, grads = loss_and_gradients(chunked, lambda: chunked(input_ids=input_ids, labels=labels).loss)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_chunked_forward_takes_trainers_num_items_in_batch_and_falls_back_without_labels():
    """Trainer passes num_items_in_batch (the forward takes **kwargs: model_accepts_loss_kwargs): the loss is the sum
    over this micro-batch / that count, as the model's own; without labels or in eval mode the model's forward runs."""
    import inspect

    reference, chunked = _standard_and_chunked(untied_llama(), TrainConfig(seq_len=24, micro_batch_size=2))
    assert any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(chunked.forward).parameters.values())
    input_ids = batch()
    items = torch.tensor(97)  # label tokens of a whole accumulated step
    torch.testing.assert_close(chunked(input_ids=input_ids, labels=input_ids, num_items_in_batch=items).loss,
                               reference(input_ids=input_ids, labels=input_ids, num_items_in_batch=items).loss)
    torch.testing.assert_close(chunked(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)
    chunked.eval()
    reference.eval()
    evaluated = chunked(input_ids=input_ids, labels=input_ids)
    expected = reference(input_ids=input_ids, labels=input_ids)
    assert evaluated.logits is not None
    torch.testing.assert_close(evaluated.loss, expected.loss)


def test_use_chunked_loss_is_idempotent_and_forward_loss_refuses_a_mismatch():
    from memtune.recipe.loss import causal_lm_of, use_chunked_loss, uses_chunked_loss

    train_config = TrainConfig(seq_len=24, micro_batch_size=2, loss="chunked", adapter=Adapter(rank=4))
    model = recipe.build_model(untied_llama(), train_config, "cpu")
    forward = causal_lm_of(model).forward
    assert uses_chunked_loss(model) and use_chunked_loss(model) is model
    assert causal_lm_of(model).forward == forward  # not wrapped twice
    with pytest.raises(ValueError, match="standard loss"):
        recipe.forward_loss(model, batch(), batch(), train_config.replace(loss="standard"))
