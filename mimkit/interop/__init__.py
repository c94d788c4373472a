"""Checkpoints in and out (a package: common, hf_keys, convert, export, import_base, imports, beit_import): export a
mimkit checkpoint to timm or Hugging Face, import official MAE, BEiT / mc-BEiT, BootMAE and Hugging Face ViTMAE
weights into a mimkit checkpoint.

No file is ever read in a way that can run code: safetensors, JSON, or
``torch.load(weights_only=True)`` with a short allowlist of inert classes that official training
checkpoints store next to their weights (``argparse.Namespace`` holding the run's arguments, paths,
numpy scalars). Anything else in a pickle is refused, and the error names the file and the globals.

Key layouts handled (names only; the conversions are written from the published parameter names):

* mimkit: ``encoder.*`` is a stock timm ``VisionTransformer`` state dict, ``decoder.*`` is MAE's
  decoder with the official attribute names.
* official MAE (``models_mae.py``): the same names without the ``encoder.`` / ``decoder.`` prefixes
  (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``; ``decoder_embed``,
  ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``).
* BEiT / mc-BEiT: timm ``Beit``'s names (``attn.q_bias`` / ``attn.v_bias``, k bias zero; layer scale
  ``gamma_1`` / ``gamma_2``; a relative position bias, shared ``rel_pos_bias.*`` or per block), an
  encoder-side ``mask_token`` and ``lm_head``, possibly under ``beit.`` / ``encoder.``: imported as a mimkit
  BEiT checkpoint (the encoder a timm ``Beit``, through ``timm.models.beit.checkpoint_filter_fn``;
  ``tokenizer.kind: none``), see ``beit_import``. Without a relative position bias the encoder is exactly a
  plain ViT: layer scale folded into ``attn.proj`` / ``mlp.fc2``, q / v biases fused.
* BootMAE: the BEiT-style encoder with a fixed sin-cos ``pos_embed``; its two cross-attention
  decoders (``decode_blocks*``, ``down*``, ``lm_head*``, ``de_pos_embed``, ``mask_token*``) are not
  MAE's decoder and are reported as unexpected by ``import``; ``convert_bootmae_official`` maps the whole
  model onto mimkit's BootMAE (decoders included).
* Hugging Face ``BeitModel`` / ``BeitForMaskedImageModeling`` (export of BEiT / mc-BEiT): ``hf_beit_key_map``.
* Hugging Face ``ViTMAEForPreTraining`` / ``ViTModel``: 5.x module names (``layers.N.attention.q_proj``)
  and the on-disk names ``save_pretrained`` writes (``encoder.layer.N.attention.attention.query``,
  ``decoder.decoder_encoder.layer.N``, and 4.x ``decoder.decoder_layers.N`` ...).
"""

from __future__ import annotations

from mimkit.files import InteropError, load_torch_file, load_weights_file
from mimkit.interop.common import FORMATS, encoder_spec, load_mimkit_checkpoint, read_hf_folder, unwrap_state_dict
from mimkit.interop.convert import (
    Converted,
    convert_bootmae_official,
    convert_hf,
    convert_mimkit,
    convert_official,
    detect_format,
)
from mimkit.interop.export import (
    export_hf,
    export_timm,
    hf_encoder_kwargs,
    hf_vit_config,
    hf_vit_mae_config,
    timm_create_kwargs,
    timm_usage,
)
from mimkit.interop.hf_keys import hf_beit_config, hf_beit_key_map, hf_canonical_key, hf_key_map, mimkit_to_hf
from mimkit.interop.import_base import ImportOptions, ImportReport
from mimkit.interop.imports import import_checkpoint, read_source

__all__ = [
    "Converted",
    "FORMATS",
    "ImportOptions",
    "ImportReport",
    "InteropError",
    "convert_bootmae_official",
    "convert_hf",
    "convert_mimkit",
    "convert_official",
    "detect_format",
    "encoder_spec",
    "export_hf",
    "export_timm",
    "hf_beit_config",
    "hf_beit_key_map",
    "hf_canonical_key",
    "hf_encoder_kwargs",
    "hf_key_map",
    "hf_vit_config",
    "hf_vit_mae_config",
    "import_checkpoint",
    "load_mimkit_checkpoint",
    "load_torch_file",
    "load_weights_file",
    "mimkit_to_hf",
    "read_hf_folder",
    "read_source",
    "timm_create_kwargs",
    "timm_usage",
    "unwrap_state_dict",
]
