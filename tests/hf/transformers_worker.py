"""What a user of an exported folder does, on whichever transformers this interpreter imports (the test runs it
on .venv's 4.x and on 5.x from a --target directory): tokenizer, text `generate`, `generate_mixed` text->image
and image->text, σ-VAE decode. Writes the results with torch.save to argv[2]."""
import builtins
import sys

import torch

asked = []
builtins.input = lambda *args, **kwargs: asked.append(args) or "n"  # records any "run custom code?" prompt

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

folder, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # the tokenizer needs no remote code
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
c = model.config
caption = tok.encode("a red cat", add_special_tokens=False)
prompt = [c.end_of_document_token_id, *caption, c.bod_token_id]
t2i = model.generate_mixed([prompt], stop_after_images=1, max_new_tokens=c.latents_per_image + 1, progress=False,
                           cfg_scale=2.0, diffusion_steps=10, seed=7)[0]
vae = model.load_sigma_vae()
with torch.no_grad():
    image = vae.decode(vae.latent_stats.unscale(t2i.images[0][None]))[0]
    latents = vae.latent_stats.scale(vae.encode(image[None].clamp(-1, 1)).float())[0]
i2t = model.generate_mixed([[c.end_of_document_token_id, c.bod_token_id, latents, c.eod_token_id]],
                           max_new_tokens=6, temperature=0.0, progress=False)[0]
ids = torch.tensor([prompt[:-1]])
text = model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:].tolist()
torch.save({"version": transformers.__version__, "model_class": type(model).__name__, "asked": len(asked),
            "caption": caption, "t2i_tokens": t2i.tokens, "image": image, "i2t_tokens": i2t.tokens, "text": text}, out)
