"""The character-level LSTM of the federated Shakespeare benchmark.

TensorFlow Federated's Shakespeare model (Reddi et al. 2021, "Adaptive Federated Optimization",
https://arxiv.org/abs/2003.00295; after McMahan et al. 2017): an 8-dimensional character
embedding, two LSTM layers of 256 units and a dense layer giving next-character logits at every
timestep. The TFF vocabulary has 86 characters plus padding, out-of-vocabulary, beginning- and
end-of-sequence tokens: 90 in all. ``hidden=128, num_layers=1`` is a narrower model for CPUs.

The recurrence is `fedjax_sim.models.lstm.FusedLSTM`: the parameters, initialization and outputs
of `flax.linen.RNN` over `flax.linen.OptimizedLSTMCell`, with every step's input projection in
one matmul and a hand-written VJP whose recurrent-kernel gradient is one matmul over all steps
(`benchmarks/lstm_recurrence.py` measures both, in one run). ``cell="flax"`` builds flax's RNN.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fedjax_sim.models.lstm import check_num_layers, lstm_layer


class CharLSTM(nn.Module):
    """Next-character model: int32 token ids ``[B, T]`` -> logits ``[B, T, vocab_size]``.

    Attributes:
      vocab_size: number of tokens, including padding and special tokens.
      embed_dim: embedding width.
      hidden: LSTM units per layer.
      num_layers: stacked LSTM layers.
      cell: ``"fused"`` (`fedjax_sim.models.lstm`) or ``"flax"``
        (``nn.RNN(nn.OptimizedLSTMCell)``): the same parameters and function.
    """

    vocab_size: int = 90
    embed_dim: int = 8
    hidden: int = 256
    num_layers: int = 2
    cell: str = "fused"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout
        check_num_layers(self.num_layers)
        h = nn.Embed(self.vocab_size, self.embed_dim)(x)
        for layer in range(self.num_layers):
            h = lstm_layer(h, self.hidden, layer, self.cell)
        return nn.Dense(self.vocab_size)(h)
