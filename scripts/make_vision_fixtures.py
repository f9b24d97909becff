"""Tiny random-weight Qwen3.5 / Qwen3-VL checkpoints with images, and transformers' float32
reference for them and for its image processor.

Run by hand when the fixtures need to change (needs torch, transformers >= 5 and Pillow):
    python scripts/make_vision_fixtures.py
Writes plugins/vision/tests/fixtures/:
  <model>/ (qwen3_5 = Qwen3_5ForConditionalGeneration, qwen3_vl = Qwen3VLForConditionalGeneration
  with two deepstack layers): config.json, preprocessor_config.json, model.safetensors,
  image.png (37x23, non-square) and golden.safetensors with
    pixel_values [N, patch_dim], grid [3]     the processor's output for image.png
    vision_out [n, H]                         the tower's merged tokens (pooler_output)
    deepstack_<i> [n, H]                      Qwen3-VL's deepstack features
    prompt_ids [1, T]                         text, <vision_start>, n image pads, <vision_end>, text
    positions [3, T]                          transformers' M-RoPE position ids of the prompt
    prefill_logits [1, T, V], decode_ids [1, S], decode_logits [1, S, V]   greedy, S = 16
  preprocess/: five images (sizes and modes RGB, RGBA, L, LA, P; PNG, JPEG, WebP) and
  reference.safetensors with pixel_values_<i>, grid_<i> of Qwen2VLImageProcessorPil
  (patch 4, merge 2, temporal 2, min_pixels 256, max_pixels 2304), settings in settings.json.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "plugins" / "vision" / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "scripts"))
from make_qwen3_5_fixtures import TEXT as QWEN35_TEXT, randomize  # noqa: E402

DECODE_STEPS, VOCAB = 16, 256
SPECIAL = dict(vision_start_token_id=248, vision_end_token_id=249, image_token_id=250,
               video_token_id=251)
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
              num_position_embeddings=16)
QWEN3_VL_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                     tie_word_embeddings=False)
PROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2,
                 size={"shortest_edge": 256, "longest_edge": 2304},
                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def test_image(width: int, height: int, mode: str, seed: int):
    """Smooth gradients plus noise (so resizing has something to do) in `mode`."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1)], -1)
    rgb = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = np.clip(rng.normal(160, 80, (height, width)), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode in ("L", "LA"):
        image = image.convert(mode)
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return image


def encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


PREPROCESS_IMAGES = [  # file, (width, height), mode, format
    ("rgb.png", (37, 23), "RGB", "PNG"),
    ("rgba.png", (100, 30), "RGBA", "PNG"),       # over max_pixels: shrinks
    ("gray.png", (9, 13), "L", "PNG"),            # under min_pixels: grows
    ("photo.jpg", (64, 40), "RGB", "JPEG"),
    ("alpha.webp", (30, 50), "RGBA", "WEBP"),
]


def make_preprocess() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil
    from PIL import Image
    folder = OUT / "preprocess"
    folder.mkdir(parents=True, exist_ok=True)
    processor = Qwen2VLImageProcessorPil(**PROCESSOR)
    ref = {}
    for i, (name, (w, h), mode, fmt) in enumerate(PREPROCESS_IMAGES):
        data = encode(test_image(w, h, mode, 100 + i), fmt)
        (folder / name).write_bytes(data)
        out = processor(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        ref[f"pixel_values_{i}"] = np.ascontiguousarray(out["pixel_values"], np.float32)
        ref[f"grid_{i}"] = np.asarray(out["image_grid_thw"][0], np.int64)
    save_file(ref, str(folder / "reference.safetensors"))
    (folder / "settings.json").write_text(json.dumps(
        {"processor": PROCESSOR, "images": [p[0] for p in PREPROCESS_IMAGES]}, indent=2) + "\n")
    print(f"preprocess: wrote {folder}")


def randomize_vl(model: torch.nn.Module, seed: int) -> None:
    """Qwen3-VL's RMSNorms scale by w (not 1 + w): keep them near 1."""
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def run_model(model, name: str, processor_out: dict, seed: int) -> dict[str, np.ndarray]:
    pixel_values = torch.from_numpy(processor_out["pixel_values"])
    grid = torch.from_numpy(processor_out["image_grid_thw"])
    n_tokens = int(grid.prod()) // 4
    gen = torch.Generator().manual_seed(seed)
    before = torch.randint(0, 240, (5,), generator=gen).tolist()
    after = torch.randint(0, 240, (4,), generator=gen).tolist()
    ids = before + [SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * n_tokens \
        + [SPECIAL["vision_end_token_id"]] + after
    prompt = torch.tensor([ids])
    mm_types = (prompt == SPECIAL["image_token_id"]).int()
    vision = model.model.visual(pixel_values, grid_thw=grid)
    out = {"pixel_values": processor_out["pixel_values"].astype(np.float32),
           "grid": processor_out["image_grid_thw"][0].astype(np.int64),
           "vision_out": vision.pooler_output.float().numpy(),
           "prompt_ids": prompt.numpy().astype(np.int64)}
    for i, feat in enumerate(getattr(vision, "deepstack_features", None) or []):
        out[f"deepstack_{i}"] = feat.float().numpy()
    positions, _ = model.model.get_rope_index(prompt, mm_token_type_ids=mm_types,
                                              image_grid_thw=grid)
    out["positions"] = positions[:, 0].numpy().astype(np.int64)
    first = model(prompt, pixel_values=pixel_values, image_grid_thw=grid,
                  mm_token_type_ids=mm_types, use_cache=True)
    cache = first.past_key_values
    next_ids = first.logits[:, -1].argmax(-1, keepdim=True)
    steps, logits = [], []
    for _ in range(DECODE_STEPS):
        steps.append(next_ids)
        step = model(next_ids, past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        logits.append(step.logits)
        next_ids = step.logits[:, -1].argmax(-1, keepdim=True)
    out.update(prefill_logits=first.logits.float().numpy(),
               decode_ids=torch.cat(steps, 1).numpy().astype(np.int64),
               decode_logits=torch.cat(logits, 1).float().numpy())
    return out


def make_models() -> None:
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil
    from PIL import Image
    text35 = dict(QWEN35_TEXT, tie_word_embeddings=False)
    made = {
        "qwen3_5": lambda: transformers.Qwen3_5ForConditionalGeneration(
            transformers.Qwen3_5Config(text_config=text35, vision_config=VISION,
                                       tie_word_embeddings=False, **SPECIAL)),
        "qwen3_vl": lambda: transformers.Qwen3VLForConditionalGeneration(
            transformers.Qwen3VLConfig(text_config=QWEN3_VL_TEXT,
                                       vision_config=dict(VISION, depth=3,
                                                          deepstack_visual_indexes=[0, 2]),
                                       tie_word_embeddings=False, **SPECIAL)),
    }
    processor = Qwen2VLImageProcessorPil(**PROCESSOR)
    image_bytes = encode(test_image(37, 23, "RGB", 7), "PNG")
    processor_out = dict(processor(images=[Image.open(io.BytesIO(image_bytes))],
                                   return_tensors="np"))
    for seed, (name, build) in enumerate(made.items()):
        torch.manual_seed(seed)
        model = build().float().eval()
        (randomize if name == "qwen3_5" else randomize_vl)(model, 40 + seed)
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "image.png").write_bytes(image_bytes)
        (folder / "preprocessor_config.json").write_text(json.dumps(
            dict(PROCESSOR, image_processor_type="Qwen2VLImageProcessor"), indent=2) + "\n")
        golden = run_model(model, name, processor_out, 300 + seed)
        save_file({k: np.ascontiguousarray(v) for k, v in golden.items()},
                  str(folder / "golden.safetensors"))
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "model_class": type(model).__name__}
        (folder / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: wrote {folder}; decode ids {golden['decode_ids'].tolist()}")


def main() -> None:
    torch.set_grad_enabled(False)
    make_preprocess()
    make_models()


if __name__ == "__main__":
    main()
