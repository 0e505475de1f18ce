"""InternVL against transformers' InternVLForConditionalGeneration and InternVLProcessor: tiny random models in
fp32 (eager attention) loaded through our key map, preprocessing bit for bit, configs both ways."""

import dataclasses
import json
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors import safe_open
from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as got_ocr2
from transformers.processing_utils import ProcessorMixin

from safework.models import from_pretrained, get_preset, init_params, save_pretrained
from safework.models.config import ConfigError
from safework.models.inputs import check_tiles
from safework.models.internvl import ACTIVATIONS, InternVL, Projector, bicubic_matrix, forward
from safework.models.internvl_config import ACTIVATIONS as ACTIVATION_NAMES, from_hf_dict, to_hf_dict
from safework.models.internvl_keys import canonical_key, hf_tensor_map
from safework.models.presets import INTERNVL_TINY_EXTRA_TOKENS
from safework.processing import internvl_images as tiling
from safework.processing import Processor, train_tokenizer
from safework.rl.batch import VisionContext, vision_features
from safework.rl.logprobs import response_logprobs
from safework.rl.losses import LossSettings
from safework.rl.objectives import PolicyGradientObjective
from safework.rl.optim import OptimSettings, make_optimizer
from safework.sampling import Sampler, SamplingSettings
from safework.training import TrainState, make_train_step
from tests.test_train_step import sampled_rows
from safework.sharding import DEFAULT_RULES

TOL = 1e-5
VOCAB = 320
PAD, IM_START, IM_END = 0, 1, 2
IMG_START, IMG_END, CONTEXT = 8, 9, 10   # the tiny tokenizer's ids of <img>, </img>, <IMG_CONTEXT>
TILE = 56                                # 4x4 patches of 14 -> 2x2 tokens per tile
PER_TILE = 4


# -- reference models -------------------------------------------------------------------------------------------

def _hf_config(variant: str) -> transformers.InternVLConfig:
  """'6b': InternViT-6B-style tower (RMSNorm, QK-norm, no q/k/v bias, final LayerNorm), untied, GQA 4:2.
  '300m': InternViT-300M-style tower (LayerNorm, q/k/v bias, no final norm), tied, GQA 4:1, dynamic rope."""
  big = variant == "6b"
  rope = {"rope_type": "default", "rope_theta": 1e4} if big else {"rope_type": "dynamic", "factor": 2.0,
                                                                  "rope_theta": 1e4}
  return transformers.InternVLConfig(
      text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2 if big else 1,
                       max_position_embeddings=512, rms_norm_eps=1e-6, rope_parameters=rope, initializer_range=0.1,
                       tie_word_embeddings=not big, bos_token_id=PAD, eos_token_id=IM_END, pad_token_id=PAD),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         image_size=TILE, patch_size=14, norm_type="rms_norm" if big else "layer_norm",
                         use_qk_norm=big, attention_bias=not big, use_mean_pooling=not big, layer_norm_eps=1e-5,
                         initializer_range=0.1),
      image_token_id=CONTEXT, image_seq_length=PER_TILE, projector_hidden_act="gelu", tie_word_embeddings=not big)


def _hf_model(config, seed: int):
  """A random model in eager fp32 with every norm, bias, layer scale and embedding randomised (transformers
  initialises them to constants, which would hide a dropped or swapped one)."""
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  model = transformers.InternVLForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias") or "cls_token" in name or "position_embeddings" in name or "lambda" in name:
        p.copy_(0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """checkpoints(variant) -> (variant, checkpoint dir, transformers model, our model, our params), built once."""
  cache = {}

  def get(variant: str):
    if variant not in cache:
      hf = _hf_model(_hf_config(variant), seed=len(cache))
      path = tmp_path_factory.mktemp(f"internvl_{variant}")
      hf.save_pretrained(path)
      model, params = from_pretrained(path)   # the project's loader, dispatched by config.json's model_type
      assert isinstance(model, InternVL)
      cache[variant] = (variant, path, hf, model, params)
    return cache[variant]

  return get


@pytest.fixture(params=["6b", "300m"])
def checkpoint(request, checkpoints):
  return checkpoints(request.param)


@pytest.fixture
def big(checkpoints):
  return checkpoints("6b")


def _hf_logits(hf, **arrays):
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if v is not None}
  with torch.no_grad():
    return hf(**tensors).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params, pixels):
  return model.apply({"params": params}, pixels, method=InternVL.encode_vision)


def _max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _prompt(tiles_per_image: list[int], text: list[int], length: int) -> list[int]:
  """<im_start> text [<img> placeholders </img> text]... <im_end> <im_start>, padded with text to `length`."""
  ids = [IM_START] + text
  for tiles in tiles_per_image:
    ids += [IMG_START] + [CONTEXT] * (PER_TILE * tiles) + [IMG_END] + text[:2]
  ids += [IM_END, IM_START]
  return ids + [20 + i % 50 for i in range(length - len(ids))]


def _pixels(tiles: int, seed: int, size: int = TILE) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((tiles, 3, size, size)).astype(np.float32)


# -- parity -----------------------------------------------------------------------------------------------------

def test_weights_round_trip_through_the_key_map(checkpoint):
  _, path, hf, model, params = checkpoint
  flat = traverse_util.flatten_dict(params)
  with safe_open(path / "model.safetensors", framework="np") as f:
    table = hf_tensor_map(model.config)
    keys = {one.key for entry in table.values() for _, one in entry.per_layer()}
    assert keys == set(f.keys())   # every checkpoint tensor is mapped, once
    for param, entry in table.items():
      for layer, one in entry.per_layer():
        ours = flat[param] if layer is None else flat[param][layer]
        np.testing.assert_array_equal(one.to_hf(ours), f.get_tensor(one.key))
  # The in-memory layout maps onto the on-disk one.
  assert {canonical_key(k) for k in hf.state_dict()} >= keys
  expected = traverse_util.flatten_dict(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
  assert set(flat) == set(expected)
  assert sum(x.size for x in flat.values()) == sum(p.numel() for p in hf.parameters())


def test_text_only(checkpoint):
  _, _, hf, model, params = checkpoint
  ids = np.array([_prompt([], [11, 12, 13, 14, 15], 12)])
  assert _max_diff(forward(model, params, ids), _hf_logits(hf, input_ids=ids)) < TOL


@pytest.mark.parametrize("tiles_per_image", [[4], [3, 1]], ids=["one_image_3_tiles_and_thumbnail",
                                                                 "two_images_of_3_and_1_tiles"])
def test_images(checkpoint, tiles_per_image):
  _, _, hf, model, params = checkpoint
  ids = np.array([_prompt(tiles_per_image, [11, 12, 13], 32)])   # one shape for both: one compile
  pixels = _pixels(sum(tiles_per_image), seed=len(tiles_per_image))
  expected = _hf_logits(hf, input_ids=ids, pixel_values=pixels)
  assert _max_diff(forward(model, params, ids, pixel_values=pixels), expected) < TOL


def test_vision_features_alone(big):
  _, _, hf, model, params = big
  pixels = _pixels(3, seed=3)
  ours = _encode(model, params, pixels)
  with torch.no_grad():
    theirs = hf.model.get_image_features(torch.from_numpy(pixels)).pooler_output
  assert ours.shape == (3 * PER_TILE, 64)
  assert _max_diff(ours, theirs.reshape(-1, 64).numpy()) < TOL
  # The projector alone on features of tiny variance, where its LayerNorm's eps (torch's default 1e-5) shows.
  features = 1e-3 * np.random.default_rng(5).standard_normal((2, PER_TILE, 128)).astype(np.float32)
  ours = Projector(model.config).apply({"params": params["visual"]["projector"]}, features)
  with torch.no_grad():
    theirs = hf.model.multi_modal_projector(torch.from_numpy(features)).numpy()
  assert _max_diff(ours, theirs) < TOL


def test_tiles_of_another_size_resize_position_embeddings_like_transformers(big):
  _, _, hf, model, params = big
  pixels = _pixels(2, seed=4, size=84)   # 6x6 patches against the config's 4x4: bicubic-resized positions
  ours = _encode(model, params, pixels)
  with torch.no_grad():
    theirs = hf.model.get_image_features(torch.from_numpy(pixels)).pooler_output
  assert ours.shape == (2 * 9, 64)
  assert _max_diff(ours, theirs.reshape(-1, 64).numpy()) < TOL


@pytest.mark.parametrize("attention", ["blockwise", "dot_product"])
def test_vision_attention_kernels_and_remat_agree(big, attention):
  _, _, _, model, params = big
  pixels = _pixels(2, seed=6)
  other = InternVL(model.config, attention=attention, remat_policy="full")
  assert _max_diff(_encode(other, params, pixels), _encode(model, params, pixels)) < TOL


def test_bicubic_matrix_is_torchs_bicubic():
  grid = torch.randn(1, 3, 5, 5, dtype=torch.float64)
  for size in (2, 5, 8, 11):
    expected = torch.nn.functional.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    m = bicubic_matrix(size, 5).astype(np.float64)   # fp32 weights: within an ulp of torch's fp64 ones
    assert _max_diff(np.einsum("yi,xj,cij->cyx", m, m, grid[0].numpy()), expected[0].numpy()) < 1e-6


def test_left_padded_batch(big):
  _, _, hf, model, params = big
  long_row = _prompt([4], [11, 12, 13], 32)
  short_row = [IM_START, 15, 16, 17, IM_END, IM_START]
  ids = np.full((2, 32), PAD)
  mask = np.zeros((2, 32), np.int64)
  ids[0], mask[0] = long_row, 1
  ids[1, -len(short_row):], mask[1, -len(short_row):] = short_row, 1
  pixels = _pixels(4, seed=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  expected = _hf_logits(hf, input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions)
  ours = np.asarray(forward(model, params, ids, mask, pixels))   # positions from the mask by default
  valid = mask.astype(bool)
  assert _max_diff(ours[valid], expected[valid]) < TOL
  alone = _hf_logits(hf, input_ids=np.array([short_row]))
  assert _max_diff(ours[1, -len(short_row):], alone[0]) < TOL


def test_placeholder_mismatch_is_named(big):
  _, _, _, model, params = big
  ids = np.array([_prompt([1], [11], 12)])
  with pytest.raises(ValueError, match="8 tokens"):
    forward(model, params, ids, pixel_values=_pixels(2, seed=0))
  with pytest.raises(ValueError, match="9 per tile"):
    check_tiles(model.config, ids, (1, 3, 84, 84))


def test_activation_names_are_implemented():
  assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


# -- preprocessing ----------------------------------------------------------------------------------------------

def _image(h, w, mode="RGB", seed=0):
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  data = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
  return PIL.Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def _their_image_processor(settings: tiling.TileSettings):
  return transformers.GotOcr2ImageProcessorPil(
      size={"height": settings.tile_size, "width": settings.tile_size}, image_mean=list(settings.mean),
      image_std=list(settings.std), crop_to_patches=settings.crop_to_patches, min_patches=settings.min_tiles,
      max_patches=settings.max_tiles)


# InternVL3's own settings (448 tiles, up to 12) and small ones that tile cheaply.
SMALL = tiling.TileSettings(tile_size=TILE, max_tiles=6)


@pytest.mark.parametrize("settings,h,w,mode,tiles", [
    (tiling.TileSettings(), 300, 700, "RGB", 11),      # 5x2 grid + thumbnail
    (tiling.TileSettings(), 448, 448, "RGB", 1),       # one tile: no thumbnail
    (tiling.TileSettings(), 900, 230, "RGBA", 5),      # a tall 1x4 grid, transparency composited on white
    (SMALL, 61, 203, "L", 4),
    (SMALL, 120, 64, "RGB", 3),
    (SMALL, 20, 25, "RGB", 1),
    (tiling.TileSettings(tile_size=TILE, crop_to_patches=False), 100, 300, "RGB", 1),
])
def test_tiles_match_transformers_bit_for_bit(settings, h, w, mode, tiles):
  image = _image(h, w, mode)
  expected = _their_image_processor(settings)(images=[image], return_tensors="np")
  ours = tiling.preprocess_image(image, settings)
  assert ours.shape == (tiles, 3, settings.tile_size, settings.tile_size) and ours.dtype == np.float32
  assert expected["num_patches"].tolist() == [tiles] == [tiling.num_tiles(h, w, settings)]
  np.testing.assert_array_equal(ours, expected["pixel_values"])


def test_grid_choice_and_tile_counts_match_transformers():
  their = _their_image_processor(tiling.TileSettings())
  for settings in (tiling.TileSettings(), tiling.TileSettings(min_tiles=2, max_tiles=6), SMALL):
    for h in (1, 30, 224, 447, 448, 449, 600, 896, 1000, 1344, 4000):
      for w in (1, 30, 224, 448, 672, 700, 896, 1344, 2000, 4000):
        expected = got_ocr2.get_optimal_tiled_canvas((h, w), (settings.tile_size,) * 2, settings.min_tiles,
                                                     settings.max_tiles)
        assert tiling.choose_grid(h, w, settings) == expected, (h, w, settings)
        kwargs = dict(crop_to_patches=True, min_patches=settings.min_tiles, max_patches=settings.max_tiles,
                      patch_size={"height": settings.tile_size, "width": settings.tile_size})
        assert tiling.num_tiles(h, w, settings) == their.get_number_of_image_patches(h, w, kwargs)


@pytest.fixture(scope="module")
def tokenizer():
  corpus = ["describe the picture please", "a cat sits on a mat", "what colour is the square?"] * 10
  tok = train_tokenizer(corpus, vocab_size=300, extra_tokens=INTERNVL_TINY_EXTRA_TOKENS + ("<video>",))
  assert tok.convert_tokens_to_ids(list(INTERNVL_TINY_EXTRA_TOKENS)) == [IMG_START, IMG_END, CONTEXT]
  tok._set_model_specific_special_tokens({"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
  return tok


class _ImageOnlyProcessor(transformers.InternVLProcessor):
  """transformers' processor without its video processor (which needs torchvision)."""

  def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
    ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
    self.image_seq_length = image_seq_length
    self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
    self.start_image_token_id, self.end_image_token_id = tokenizer.start_image_token_id, tokenizer.end_image_token_id
    self.image_token, self.image_token_id = tokenizer.context_image_token, tokenizer.context_image_token_id
    self.video_token = tokenizer.video_token
    self.multimodal_pattern = re.compile(f"(?P<image>{re.escape(self.image_token)})|"
                                         f"(?P<video>{re.escape(self.video_token)})")


def test_processor_matches_transformers(tokenizer):
  texts = ["a cat <IMG_CONTEXT> sits on <IMG_CONTEXT>", "describe <IMG_CONTEXT> please"]
  images = [_image(61, 203, seed=1), _image(56, 56, seed=2), _image(150, 90, seed=3)]
  theirs = _ImageOnlyProcessor(_their_image_processor(SMALL), tokenizer, image_seq_length=PER_TILE)
  expected = theirs(text=list(texts), images=images, padding=True, return_tensors="np",
                    images_kwargs=dict(max_patches=SMALL.max_tiles))
  pixels, tiles = tiling.preprocess_images(images, SMALL)
  assert tiles == [4, 1, 7]
  np.testing.assert_array_equal(pixels, expected["pixel_values"])
  expanded = tiling.expand_image_placeholders(texts, tiles, PER_TILE)
  ours = tokenizer(expanded, padding=True, padding_side="left", return_tensors="np")
  np.testing.assert_array_equal(ours["input_ids"], expected["input_ids"])
  np.testing.assert_array_equal(ours["attention_mask"], expected["attention_mask"])
  assert (ours["input_ids"] == CONTEXT).sum() == PER_TILE * sum(tiles)
  sizes = [(image.height, image.width) for image in images]
  counts = theirs._get_num_multimodal_tokens(image_sizes=sizes, images_kwargs=dict(max_patches=SMALL.max_tiles))
  assert [tiling.num_image_tokens(h, w, PER_TILE, SMALL) for h, w in sizes] == counts.num_image_tokens
  with pytest.raises(tiling.ImageError, match="3 <IMG_CONTEXT> placeholders but 2 images"):
    tiling.expand_image_placeholders(texts, [1, 1], PER_TILE)


def test_the_projects_processor_reads_tiles_like_transformers(tokenizer, tmp_path):
  """`Processor` with InternVL's tiles, saved and read back from a checkpoint directory, gives transformers'
  arrays (left-padded, as the sampler takes them)."""
  texts = ["a cat <IMG_CONTEXT> sits", "describe <IMG_CONTEXT> please <IMG_CONTEXT>"]
  images = [_image(150, 90, seed=4), _image(56, 56, seed=5), _image(61, 203, seed=6)]
  Processor(tokenizer, dataclasses.replace(SMALL, image_seq_length=PER_TILE)).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "preprocessor_config.json").read_text())
  # GotOcr2's own default is crop_to_patches=false; InternVLProcessor crops all the same.
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(config | {"crop_to_patches": False}))
  processor = Processor.from_pretrained(tmp_path)
  assert processor.image_settings == dataclasses.replace(SMALL, image_seq_length=PER_TILE)
  ours = processor(texts, images=images)
  theirs = _ImageOnlyProcessor(_their_image_processor(SMALL), tokenizer, image_seq_length=PER_TILE)
  expected = theirs(text=list(texts), images=images, padding=True, padding_side="left", return_tensors="np",
                    images_kwargs=dict(max_patches=SMALL.max_tiles))
  for key in ("input_ids", "attention_mask", "pixel_values"):
    np.testing.assert_array_equal(ours[key], expected[key])
  assert set(ours) == {"input_ids", "attention_mask", "pixel_values"}
  assert processor.count_tokens(texts[1], [(56, 56), (61, 203)]) == int(ours["attention_mask"][1].sum())


# -- configs and presets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["internvl3_8b", "internvl3_78b", "internvl_tiny"])
def test_config_round_trips_through_transformers(name):
  cfg = get_preset(name)
  assert from_hf_dict(to_hf_dict(cfg)) == cfg
  theirs = transformers.InternVLConfig.from_dict(to_hf_dict(cfg))
  assert from_hf_dict(theirs.to_dict()) == cfg   # transformers' own serialisation parses back
  assert theirs.tie_word_embeddings == cfg.tie_word_embeddings


def test_saved_config_parses(checkpoint):
  variant, path, _, model, _ = checkpoint
  cfg = model.config
  assert cfg.vision.use_qk_norm == (variant == "6b") and cfg.tie_word_embeddings == (variant != "6b")
  assert cfg.dynamic_rope_factor == (None if variant == "6b" else 2.0)
  assert cfg.text.mrope_section == (8, 0, 0) and cfg.tokens_per_tile == PER_TILE


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("model_type"), "model_type"),
    (lambda d: d["text_config"].pop("num_key_value_heads"), "num_key_value_heads"),
    (lambda d: d["vision_config"].pop("hidden_size"), "hidden_size"),
    (lambda d: d["text_config"].update(model_type="llama"), "text_config.model_type"),
    (lambda d: d["text_config"].update(use_sliding_window=True), "sliding"),
    (lambda d: d["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (lambda d: d.update(vision_feature_layer=-2), "vision_feature_layer"),
    (lambda d: d.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (lambda d: d["vision_config"].update(image_size=[448, 224]), "image_size"),
    (lambda d: d["vision_config"].update(norm_type="batch_norm"), "norm_type"),
    (lambda d: d.update(image_seq_length=100), "image_seq_length"),
    (lambda d: d.update(downsample_ratio=0.3), "downsample_ratio"),
])
def test_bad_config_names_the_key(change, message):
  d = to_hf_dict(get_preset("internvl3_8b"))
  change(d)
  with pytest.raises(ConfigError, match=message):
    from_hf_dict(d)


def test_tiny_preset_runs():
  cfg = get_preset("internvl_tiny")
  model = InternVL(cfg)
  params = jax.jit(functools.partial(init_params, model))(jax.random.key(0))
  ids = np.array([[IM_START, IMG_START] + [cfg.image_token_id] * (5 * cfg.tokens_per_tile) + [IMG_END, 20]])
  logits = forward(model, params, ids, pixel_values=np.zeros((5, 3, 56, 56), np.float32))
  assert logits.shape == (1, ids.shape[1], cfg.text.vocab_size) and np.isfinite(np.asarray(logits)).all()
  # Every parameter names its dimensions with axes the sharding rules know.
  known = {name for name, _ in DEFAULT_RULES}
  for path, boxed in traverse_util.flatten_dict(params).items():
    assert set(boxed.names) - {None} <= known, (path, boxed.names)


def test_export_round_trip_loads_in_transformers(checkpoint, tmp_path):
  _, _, hf, model, params = checkpoint
  save_pretrained(tmp_path, model, params)
  again = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
  assert set(again.state_dict()) == set(hf.state_dict())
  for name, tensor in hf.state_dict().items():
    torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)


def _two_prompts():
  """Two prompts (one left-padded) with images of 3 tiles + thumbnail and of 1 tile."""
  rows = [_prompt([4], [11, 12, 13], 30), _prompt([1], [14, 15], 24)]
  ids = np.zeros((2, 30), np.int64)
  mask = np.zeros((2, 30), np.int64)
  for r, row in enumerate(rows):
    ids[r, 30 - len(row):], mask[r, 30 - len(row):] = row, 1
  return ids, mask, np.concatenate([_pixels(4, seed=1), _pixels(1, seed=2)])


def test_greedy_generation_through_the_sampler_equals_generate(checkpoint):
  _, _, hf, model, params = checkpoint
  ids, mask, pixels = _two_prompts()
  steps = 8
  out = Sampler(model).generate(params, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels),
                                jax.random.key(0), SamplingSettings(max_new_tokens=steps, temperature=0.0))
  with torch.no_grad():
    expected = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           pixel_values=torch.from_numpy(pixels), max_new_tokens=steps, do_sample=False,
                           eos_token_id=None, pad_token_id=PAD)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected[:, ids.shape[1]:].numpy())


def test_rl_rows_score_the_sampled_tokens_as_the_sampler_did_and_the_tower_stays_frozen(big):
  """The RL path with tiles: rollout -> training rows -> log-probs equal the sampler's; one optimizer step with
  the default freeze (the vision subtree, `visual`) moves the decoder and leaves the tower and projector."""
  _, _, _, model, params = big
  ids, mask, pixels = _two_prompts()
  prompts = dict(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32), pixel_values=pixels)
  out = Sampler(model).generate(params, prompts, jax.random.key(0), SamplingSettings(max_new_tokens=6, temperature=1.0),
                                num_samples=2)
  batch, vision = sampled_rows(model, prompts, out)
  features = vision_features(model, params, vision)
  logp, _ = jax.jit(lambda p, b, f: response_logprobs(model, p, b, f, chunk=4))(params, batch, features)
  valid = np.asarray(batch.loss_mask).astype(bool)
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(batch.sampler_logp)[valid], atol=2e-5)

  optim = OptimSettings(learning_rate=1e-2, warmup_fraction=0.0)
  assert optim.freeze_prefixes == ("visual",) and not optim.vision_trainable
  tx = make_optimizer(optim, 10, params)
  objective = PolicyGradientObjective(model=model, logprob_chunk=4, loss=LossSettings(policy_loss="ppo", kl_in="none"))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  new, _ = jax.jit(make_train_step(objective, tx, 1))(state, batch, VisionContext(vision=vision, features=features))
  moved = traverse_util.flatten_dict(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                                  params, new.params))
  assert all(v == 0 for path, v in moved.items() if path[0] == "visual")
  assert max(v for path, v in moved.items() if path[0] == "decoder") > 0


def test_the_tiny_preset_from_scratch_reads_the_suites_images(tmp_path):
  """`internvl_tiny` from scratch: its processor (tiles, InternVL's image tokens in the trained tokenizer) turns the
  tiny suite's image questions into prompts the sampler generates from."""
  from safework.data import tiny_suite
  from safework.policy import PolicySettings, load_processor, policy_model
  from safework.sampling.prompts import PromptBatch
  settings = PolicySettings(preset="internvl_tiny", max_pixels=56 * 56 * 4)
  processor = load_processor(settings, tmp_path, tiny_suite.corpus(0)[:200])
  assert processor.tokenizer.convert_tokens_to_ids(list(INTERNVL_TINY_EXTRA_TOKENS)) == [8, 9, 10]
  examples = [e for e, _ in tiny_suite.generate("test", 40, seed=0) if e.images][:3]
  batch = PromptBatch.of(examples, processor, max_length=256, bucket_images=0)
  model = policy_model(settings)
  assert isinstance(model, InternVL)
  assert (batch.input_ids == model.config.image_token_id).sum() == PER_TILE * len(batch.pixel_values)
  params = init_params(model, jax.random.key(0))
  out = Sampler(model).generate(params, batch.arrays(), jax.random.key(1), SamplingSettings(max_new_tokens=4))
  assert np.asarray(out.tokens).shape == (3, 4)
