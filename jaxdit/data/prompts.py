"""System prompts prepended to captions (Lumina-Image 2.0, its Table 1 and official code).

The data pipeline prepends ``data.system_prompt`` to every training caption and sampling
prepends ``data.sample_system_prompt``. Caption dropout replaces the *whole* string, system
prompt included, by the empty caption (:func:`jaxdit.models.registry.null_condition`), and
the unconditional branch of CFG is the empty caption too, as in the official code.
"""
from __future__ import annotations

from jaxdit.data.tokenizer import WordTokenizer

SYSTEM_PROMPTS = {
    "": "",
    # Table 1, Template A: ordinary training data, and the "base" sampling type.
    "base": "You are an assistant designed to generate high-quality images based on user "
            "prompts. <Prompt Start> ",
    # Table 1, Template B: the "real" sampling type (the official sampling default).
    "real": "You are an assistant designed to generate superior images with the superior "
            "degree of image-text alignment based on textual prompts or user prompts. "
            "<Prompt Start> ",
    # Official fine-tuning script, for data with super-high-quality captions.
    "high_quality": "You are an assistant designed to generate high-quality images with the "
                    "highest degree of image-text alignment based on textual prompts. "
                    "<Prompt Start> ",
    # Table 1, Template C: a dual-panel (image | depth map) task prompt.
    "depth_panel": "Generate a dual-panel image where the lower half displays a depth map, "
                   "while the upper half retains the original image for direct visual "
                   "comparison. <Prompt Start> ",
}


def system_prompt(name: str) -> str:
    if name not in SYSTEM_PROMPTS:
        raise ValueError(f"Unknown system prompt {name!r}; available: "
                         f"{sorted(k for k in SYSTEM_PROMPTS if k)} or '' for none.")
    return SYSTEM_PROMPTS[name]


def apply_template(caption: str, name: str) -> str:
    """``"<system prompt><caption>"`` (the caption unchanged when ``name`` is '')."""
    return system_prompt(name) + caption


def prompt_words(*names: str) -> list[str]:
    """Words of the named system prompts, for word-level vocabularies."""
    return [w for n in names for w in WordTokenizer.split(system_prompt(n))]
