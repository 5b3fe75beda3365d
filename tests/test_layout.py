"""Parameter layouts: unrolled layer_i against scanned layers [L, ...], conversion both ways on
concrete and abstract trees, and the checks that accept either."""

import jax
import numpy as np
import pytest

from bert_jax import params as layout
from bert_jax.config import BertConfig
from bert_jax.heads import BertForSequenceClassification

TINY = BertConfig(vocab_size=99, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37,
                  max_position_embeddings=64)
SCANNED = TINY.replace(scan_layers=True)


@pytest.fixture(scope="module")
def classifier():
  """A fine-tuning tree {"bert", "classifier"} of jax arrays, layers unrolled."""
  ids = np.ones((2, 5), np.int32)
  model = BertForSequenceClassification(TINY, num_labels=3)
  return model.init(jax.random.key(0), ids, ids, ids)["params"]


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert type(x) is type(y)
    if isinstance(x, jax.ShapeDtypeStruct):
      assert (x.shape, x.dtype) == (y.shape, y.dtype)
    else:
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["jax", "numpy"])
def test_round_trip_is_exact(classifier, kind):
  params = classifier if kind == "jax" else jax.device_get(classifier)
  stacked = layout.stack_layers(params)
  layers = stacked["bert"]["encoder"]
  assert list(layers) == ["layers"] and layout.is_scanned(stacked)
  kernel = layers["layers"]["ffn"]["intermediate"]["kernel"]
  second = params["bert"]["encoder"]["layer_1"]["ffn"]["intermediate"]["kernel"]
  assert kernel.shape == (3, 32, 37) and type(kernel) is type(second)
  np.testing.assert_array_equal(kernel[1], second)
  assert stacked["classifier"] is params["classifier"]  # the rest is shared, not copied
  _assert_same(layout.unstack_layers(stacked), params)
  _assert_same(layout.stack_layers(stacked), stacked)  # each is a no-op on its own layout
  _assert_same(layout.unstack_layers(params), params)
  encoder = layout.stack_layers(params["bert"])  # an encoder-only tree
  _assert_same(encoder, stacked["bert"])
  _assert_same(layout.unstack_layers(encoder), params["bert"])


def test_abstract_trees_convert():
  unrolled, scanned = layout.abstract_params(TINY), layout.abstract_params(SCANNED)
  assert not layout.is_scanned(unrolled) and layout.is_scanned(scanned)
  _assert_same(layout.stack_layers(unrolled), scanned)
  _assert_same(layout.unstack_layers(scanned), unrolled)
  _assert_same(layout.match_layout(unrolled, SCANNED), scanned)
  _assert_same(layout.match_layout(scanned, TINY), unrolled)


def test_unstacking_refuses_disagreeing_layer_counts():
  scanned = layout.abstract_params(SCANNED)
  ffn = scanned["bert"]["encoder"]["layers"]["ffn"]
  ffn["output"]["bias"] = jax.ShapeDtypeStruct((2, 32), ffn["output"]["bias"].dtype)
  with pytest.raises(layout.ConversionError, match=r"layer count .*: \[2, 3\]"):
    layout.unstack_layers(scanned)


def test_check_and_complete_accept_either_layout(classifier):
  stacked = layout.stack_layers(classifier)
  for tree in (classifier, stacked, stacked["bert"]):
    for config in (TINY, SCANNED):  # whatever the config says
      layout.check_params(config, {"bert": tree["bert"] if "bert" in tree else tree})
  full = layout.complete_params(TINY, stacked["bert"])
  assert set(full) == {"bert", "mlm", "nsp"} and layout.is_scanned(full)
  layout.check_params(TINY, full)
  with pytest.raises(layout.ConversionError, match="layer count: the model config says 4 but "
                     "the weights have 3"):
    layout.check_params(TINY.replace(num_layers=4), full)
  with pytest.raises(layout.ConversionError, match="intermediate size: the model config says 40 "
                     "but the weights have 37"):
    layout.check_params(TINY.replace(intermediate_size=40), full)
  short = layout.stack_layers(jax.device_get(classifier))
  ln = short["bert"]["encoder"]["layers"]["ffn_layer_norm"]
  ln["scale"] = ln["scale"][:2]
  with pytest.raises(layout.ConversionError, match=r"bert/encoder/layers/ffn_layer_norm/scale "
                     r"expected \(3, 32\) found \(2, 32\)"):
    layout.check_params(TINY, {"bert": short["bert"]})
