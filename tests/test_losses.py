"""Loss and accuracy sums: the values the trainer divides by global counts."""

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import losses


def test_accuracy_equals_argmax_without_ties():
  logits = jax.random.normal(jax.random.key(0), (4, 7, 301))
  labels = jax.random.randint(jax.random.key(1), (4, 7), 0, 301)
  labels = labels.at[:, 0].set(jnp.argmax(logits[:, 0], -1))  # some right answers
  weights = (jnp.arange(7) < 5).astype(jnp.float32)[None].repeat(4, 0)
  correct, count = losses.accuracy_sum(logits, labels, weights)
  expected = np.sum((np.argmax(logits, -1) == labels) * weights)
  assert float(correct) == expected >= 4 and float(count) == 20


def test_accuracy_counts_a_tie_as_correct_and_cross_entropy_is_a_sum():
  logits = jnp.array([[1.0, 3.0, 3.0], [0.0, 0.0, 5.0]])
  correct, _ = losses.accuracy_sum(logits, jnp.array([2, 0]), jnp.ones(2))
  assert float(correct) == 1.0
  loss, n = losses.cross_entropy_sum(logits, jnp.array([2, 0]), jnp.array([1.0, 0.5]))
  logp = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(float(loss), -(logp[0, 2] + 0.5 * logp[1, 0]), rtol=1e-6)
  assert float(n) == 1.5
