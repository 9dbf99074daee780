"""The two StackOverflow models of TensorFlow Federated's baselines.

Both follow Reddi et al. 2021, "Adaptive Federated Optimization"
(https://arxiv.org/abs/2003.00295) and TFF's ``tff.simulation.baselines.stackoverflow``.

* `StackOverflowLSTM`, next-word prediction (TFF's ``create_recurrent_model``): a 96-wide
  embedding, one LSTM layer of 670 units, a dense projection back to 96 and a dense layer to
  logits over the extended vocabulary: 10,000 words + padding, one out-of-vocabulary bucket,
  beginning- and end-of-sentence = 10,004 ids (pad 0, words 1..10000, oov 10001, bos 10002,
  eos 10003). 4,050,748 parameters. TFF reports accuracy without padding, out-of-vocabulary and
  end-of-sentence labels (bos never is a label): `next_word_ignore_labels`.
* `TagLogisticRegression`, tag prediction (TFF's ``create_tag_prediction_task``): logistic
  regression from a bag of words (each vocabulary word's count divided by the number of
  tokens) to 500 independent sigmoid outputs, one per tag. 10,000 words x 500 tags + 500 biases
  = 5,000,500 parameters.

Initializers follow Keras's defaults where flax allows (embedding U(-0.05, 0.05), Glorot-uniform
dense kernels, zero biases); the LSTM cell uses flax's (Lecun-normal input kernels, orthogonal
recurrent kernels, zero biases, where Keras adds 1 to the forget gate's bias).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.lstm import check_num_layers, lstm_layer

# TFF's next-word layout: pad, 10,000 words, one oov bucket, bos, eos.
WORD_VOCAB_SIZE = 10_000
NUM_SPECIAL_AFTER_WORDS = 3  # oov, bos, eos
EXTENDED_VOCAB_SIZE = 1 + WORD_VOCAB_SIZE + NUM_SPECIAL_AFTER_WORDS  # 10,004
NUM_TAGS = 500


def next_word_ignore_labels(vocab_size: int = EXTENDED_VOCAB_SIZE) -> tuple[int, ...]:
    """Pad, oov, bos and eos ids of a ``vocab_size``-id next-word task (TFF's layout).

    ``(0, 10001, 10002, 10003)`` for the default 10,004 ids: the labels TFF's
    ``accuracy_without_out_of_vocab_or_end_of_sentence`` leaves out.
    """
    if vocab_size < 1 + NUM_SPECIAL_AFTER_WORDS + 1:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no word ids: TFF's layout is pad 0, words, then "
            "oov, bos and eos"
        )
    return (0, vocab_size - 3, vocab_size - 2, vocab_size - 1)


def _uniform(limit: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class StackOverflowLSTM(nn.Module):
    """Next-word model: int32 token ids ``[B, T]`` -> logits ``[B, T, vocab_size]``.

    Padding is trailing (TFF pads after the end-of-sentence token), so the LSTM's outputs at
    real tokens do not depend on it (Keras's ``mask_zero`` only matters for padded steps).

    Attributes:
      vocab_size: number of token ids, special ids included (10,004).
      embed_dim: embedding width, also the width of the projection after each LSTM (96).
      hidden: LSTM units (670).
      num_layers: LSTM layers, each followed by a dense projection to ``embed_dim`` (1).
      shared_embedding: output logits through the transposed input embedding (TFF's
        ``shared_embedding=True``; no output dense layer, no output bias).
    """

    vocab_size: int = EXTENDED_VOCAB_SIZE
    embed_dim: int = 96
    hidden: int = 670
    num_layers: int = 1
    shared_embedding: bool = False
    cell: str = "fused"  # or "flax": the same LSTM (`fedjax_sim.models.lstm`)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout
        check_num_layers(self.num_layers)
        embed = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=_uniform(0.05),  # Keras's default
        )
        h = embed(x)
        for layer in range(self.num_layers):
            h = lstm_layer(h, self.hidden, layer, self.cell)
            h = nn.Dense(self.embed_dim, kernel_init=nn.initializers.glorot_uniform())(h)
        if self.shared_embedding:
            return embed.attend(h)
        return nn.Dense(self.vocab_size, kernel_init=nn.initializers.glorot_uniform())(h)


def bag_of_words(tokens: jax.Array, vocab_size: int, num_special: int) -> jax.Array:
    """Normalized word counts: ``[B, T]`` token ids -> ``[B, vocab_size - 1 - num_special]``.

    Column ``w - 1`` holds the count of word id ``w`` (ids ``1 .. vocab_size - 1 - num_special``)
    divided by the number of non-padding tokens; padding (id 0) is ignored, and the trailing
    ``num_special`` ids (oov, bos, eos) count in that length but get no column, as TFF's
    out-of-vocabulary bucket does (``reduce_mean`` of one-hots, then the oov column dropped).
    """
    num_words = vocab_size - 1 - num_special
    weights = _token_weights(tokens, num_words)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    columns = jnp.clip(tokens - 1, 0, num_words - 1)
    return jnp.zeros((tokens.shape[0], num_words), weights.dtype).at[rows, columns].add(weights)


def _token_weights(tokens: jax.Array, num_words: int) -> jax.Array:
    """``[B, T]``: 1 / (non-padding tokens of the row) for word ids, 0 for everything else."""
    length = jnp.sum(tokens > 0, axis=-1, keepdims=True).astype(jnp.float32)
    is_word = (tokens >= 1) & (tokens <= num_words)
    return jnp.where(is_word, 1.0 / jnp.maximum(length, 1.0), 0.0)


class TagLogisticRegression(nn.Module):
    """Tag prediction: int32 token ids ``[B, T]`` -> ``[B, num_classes]`` tag logits.

    Logistic regression on `bag_of_words` (a sigmoid per tag: train it as a multi-label model,
    ``Model.task == "multilabel"``). The dense layer is computed as a gather of the kernel rows
    of the question's words, weighted by 1 / length: the same numbers as ``bag @ kernel`` without
    building the ``[B, vocab]`` bag or multiplying its zeros.

    Attributes:
      num_classes: number of tags (500).
      vocab_size: number of token ids: pad 0, then the words, then ``num_special`` ids (10,004).
      num_special: trailing special ids (oov, bos, eos: 3) that count in the length but have
        no weight; 0 gives every non-padding id a column.
    """

    num_classes: int = NUM_TAGS
    vocab_size: int = EXTENDED_VOCAB_SIZE
    num_special: int = NUM_SPECIAL_AFTER_WORDS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout
        num_words = self.vocab_size - 1 - self.num_special
        if num_words < 1:
            raise ValueError(
                f"TagLogisticRegression: vocab_size={self.vocab_size} with "
                f"num_special={self.num_special} leaves no word ids"
            )
        if x.ndim != 2:
            raise ValueError(f"TagLogisticRegression expects token ids [B, T], got {x.shape}")
        kernel = self.param(
            "kernel", nn.initializers.glorot_uniform(), (num_words, self.num_classes)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,))
        weights = _token_weights(x, num_words)
        rows = jnp.take(kernel, jnp.clip(x - 1, 0, num_words - 1), axis=0)  # [B, T, classes]
        return jnp.einsum("bt,btk->bk", weights, rows) + bias
