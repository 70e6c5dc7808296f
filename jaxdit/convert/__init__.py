"""Weight conversion: published PyTorch checkpoints (diffusers / Hugging Face layouts,
read with numpy: no torch) to jaxdit params. It sits above :mod:`jaxdit.models` (it builds
models to check names and shapes against) and below :mod:`jaxdit.train`.

* :mod:`~jaxdit.convert.common`: :class:`ConversionError`, the name/shape check, folder
  reading;
* :mod:`~jaxdit.convert.lumina`, :mod:`~jaxdit.convert.dit`,
  :mod:`~jaxdit.convert.baselines` (PixArt-alpha, SD3's MMDiT): denoisers;
* :mod:`~jaxdit.convert.vae`: the diffusers ``AutoencoderKL``;
* :mod:`~jaxdit.convert.text`: BERT/MiniLM, CLIP, T5 and Gemma text encoders;
* :mod:`~jaxdit.convert.folders`: a whole diffusers folder, what ``jaxdit convert`` runs
  (``python -m jaxdit.convert``).
"""
