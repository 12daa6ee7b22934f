"""The shared training recipe: models built the way every stage builds them."""

from __future__ import annotations

import pytest

from memtune.config import TrainConfig
from memtune.recipe import step as recipe
from tests.models import tiny_llama


@pytest.mark.parametrize("tied", [True, False])
def test_an_uninitialised_model_keeps_the_embedding_tying_of_its_config(tied: bool) -> None:
    # transformers' no_init_weights also skips tie_weights: an untied copy of a tied head was a whole
    # vocabulary-sized parameter (+ gradient + AdamW state) more than the model memtune predicts.
    config = tiny_llama(layers=1)
    config.tie_word_embeddings = tied
    for initialise in (True, False):
        model = recipe.build_model(config, TrainConfig(seq_len=16), "cpu", initialise=initialise)
        same = model.get_input_embeddings().weight is model.get_output_embeddings().weight
        assert same is tied, (initialise, tied)
