"""Autoregressive generation of mixed text / latent sequences (paper 2.2).

One loop for every backend. Text positions sample the next token from the LM head (greedy,
temperature, top-p). After `<BOD>` each next latent comes from the diffusion head conditioned on the
current hidden state (DPM-Solver++, classifier-free guidance with the conditional and unconditional
streams stacked in one batch), and is fed back as the next input; after `latents_per_image` latents
`<EOD>` is forced and text resumes. Speech runs have no fixed length (`SamplingConfig.max_run_latents`):
a run ends when the LM head at its last latent prefers `<EOD>` over `<LATENT>` (what the speech data
trains it to say there), or after `max_run_latents` latents.

A backend is a `Decoder`: `step()` feeds new positions and returns the last position's logits and
hidden state. KV-cached decoders (transformers' DynamicCache in the HF export, megatron's
StaticInferenceContext) feed only the new position; `RecomputeDecoder` runs the whole prefix again
at every step (the reference, and the cache-less side of the benchmark). Prompts of different
lengths are left-padded; the attention mask hides the padding.

Self-contained on purpose (torch, tqdm and the sampler): `hf/convert.py` (the export) copies this
file into every exported Hugging Face folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch
from tqdm.auto import tqdm

from latentlm_mcore.diffusion.samplers import classifier_free_guidance, dpm_solver_pp_sample

# A prompt is a list of segments: a token id, or a run of (scaled) latent vectors [n, latent_dim]
# that fills n latent positions. Put <BOD> / <EOD> around an image run yourself.
Segment = Union[int, torch.Tensor]
Prompt = Sequence[Segment]


@dataclass
class SpecialTokens:
    bod: int  # begin of diffusion: the next positions are latents
    eod: int  # end of diffusion: forced after `latents_per_image` latents
    latent: int  # placeholder id at latent positions (its embedding is replaced by the latent)
    end_of_document: int  # separates documents; starts a prompt, stops text generation
    latents_per_image: int


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # positions generated per row, latents included
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    cfg_scale: float = 1.0  # classifier-free guidance of latents; 1 = off (no unconditional stream)
    diffusion_steps: int = 20
    seed: int = 0
    stop_after_images: int | None = None  # a row stops once it has closed this many latent runs
    # None: every latent run is an image of exactly `latents_per_image` latents. Set (speech): a run ends when
    # the LM head at its last latent prefers <EOD> over <LATENT> (argmax over the two), or at this many latents
    max_run_latents: int | None = None


@dataclass
class Sample:
    tokens: list[int] = field(default_factory=list)  # generated ids, the latent placeholder at latent positions
    images: list[torch.Tensor] = field(default_factory=list)  # each closed latent run [n, latent_dim], scaled
    run_ends: list[str] = field(default_factory=list)  # per closed run: "eod" (the LM head chose <EOD>) or "max"


class Decoder:
    """A model behind the loop: the backbone step plus its diffusion head."""

    def __init__(self, head, alphas_cumprod: torch.Tensor, prediction: str, latent_dim: int):
        self.head, self.alphas_cumprod, self.prediction, self.latent_dim = head, alphas_cumprod, prediction, latent_dim
        self.device = next(head.parameters()).device  # the loop's own tensors stay on the CPU

    def start(self, max_length: int) -> None:
        """Forget all state: a new batch follows, of at most `max_length` positions per row."""
        raise NotImplementedError

    def step(self, input_ids: torch.Tensor, latents: torch.Tensor, latent_mask: torch.Tensor,
             attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed new positions: ids [b, n], latents [b, n, D], latent_mask [b, n] (bool), attention_mask
        [b, everything fed so far + n] (1 = real, 0 = left padding), all on the CPU. Returns the last
        position's (logits [b, vocab], hidden [b, hidden]) in float32 on the CPU."""
        raise NotImplementedError

    @torch.no_grad()
    def denoise_fn(self, hidden: torch.Tensor) -> Callable:
        """The head as a sampler's denoiser, conditioned on `hidden` [n, H] (condition computed once)."""
        weight = self.head.condition_proj.weight
        condition = self.head.embed_condition(hidden.to(weight.device, weight.dtype))

        def denoise(x_t, t):  # x_t, t on self.device
            return self.head(x_t, t, condition).float()

        return denoise


class RecomputeDecoder(Decoder):
    """Runs the whole sequence at every step through `forward(ids, latents, latent_mask,
    attention_mask) -> (logits [b, s, V], hidden [b, s, H])`: no KV cache."""

    def __init__(self, forward: Callable, head, alphas_cumprod, prediction, latent_dim):
        super().__init__(head, alphas_cumprod, prediction, latent_dim)
        self.forward = forward

    def start(self, max_length: int) -> None:
        self.history = None

    @torch.no_grad()
    def step(self, input_ids, latents, latent_mask, attention_mask):
        if self.history is None:
            self.history = (input_ids, latents, latent_mask)
        else:
            self.history = tuple(torch.cat([old, new], dim=1) for old, new in
                                 zip(self.history, (input_ids, latents, latent_mask)))
        logits, hidden = self.forward(*(x.to(self.device) for x in (*self.history, attention_mask)))
        return logits[:, -1].float().cpu(), hidden[:, -1].float().cpu()


def unconditional_prompt(prompt: Prompt, special: SpecialTokens) -> list[Segment]:
    """What the unconditional stream of classifier-free guidance sees: a bare document start, then the
    still-open image of the prompt (its <BOD> and latents so far), if any."""
    flat = _flatten(prompt)
    n_open = _open_image_latents(flat, special)
    if n_open is None:
        return [special.end_of_document]
    if n_open == 0:
        return [special.end_of_document, special.bod]
    return [special.end_of_document, special.bod, torch.stack(flat[len(flat) - n_open:])]


def class_prompts(labels: Sequence[int], special: SpecialTokens, num_classes: int, null_class: int):
    """Prompts of class-conditional generation: `<class> <BOD>` and, for guidance's unconditional stream in
    the same batch, `<NULL_CLASS> <BOD>`. No <END_OF_DOCUMENT> in front: class data is one image per
    sequence, so in training the class token is always at position 0 (data/schema.py)."""
    bad = [c for c in labels if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is not one of the model's {num_classes} classes (0..{num_classes - 1})")
    return [[int(c), special.bod] for c in labels], [[null_class, special.bod] for _ in labels]


def speech_prompts(texts: Sequence[Sequence[int]], voices: Sequence[torch.Tensor], special: SpecialTokens):
    """Prompts of text-to-speech in the speech documents' layout (data/schema.py): `<END_OF_DOCUMENT> <BOD>
    voice latents <EOD> text ids <BOD>`, and for guidance's unconditional stream in the same batch the same
    without the text (what condition dropout trains)."""
    if len(texts) != len(voices):
        raise ValueError(f"{len(texts)} texts but {len(voices)} voice prompts; give one voice per text")
    for i, voice in enumerate(voices):
        if voice.dim() != 2 or voice.shape[0] == 0:
            raise ValueError(f"voice prompt {i} must be latents [n > 0, latent_dim], got {tuple(voice.shape)}")
    head = [[special.end_of_document, special.bod, voice, special.eod] for voice in voices]
    return ([[*h, *map(int, ids), special.bod] for h, ids in zip(head, texts)],
            [[*h, special.bod] for h in head])


@torch.no_grad()
def generate(decoder: Decoder, prompts: Sequence[Prompt], special: SpecialTokens, config: SamplingConfig,
             uncond_prompts: Sequence[Prompt] | None = None, progress: bool = True) -> list[Sample]:
    """Generate a continuation of every prompt (one batch). Randomness comes from one generator
    seeded with `config.seed`, drawn in a fixed order, so every backend gives the same samples."""
    batch = len(prompts)
    use_cfg = config.cfg_scale != 1.0
    rows = list(prompts)
    if use_cfg:
        if uncond_prompts is None:
            uncond_prompts = [unconditional_prompt(p, special) for p in prompts]
        rows += list(uncond_prompts)
    ids, latents, latent_mask, attention = _left_pad([_flatten(p) for p in rows], decoder.latent_dim)
    latents_done = [_open_image_latents(_flatten(p), special) for p in prompts]  # None = text mode
    generator = torch.Generator().manual_seed(config.seed)
    samples, done, current = [Sample() for _ in prompts], [False] * batch, [[] for _ in prompts]

    decoder.start(ids.shape[1] + config.max_new_tokens)
    logits, hidden = decoder.step(ids, latents, latent_mask, attention)
    for _ in tqdm(range(config.max_new_tokens), desc="generating", disable=not progress, leave=False):
        # fixed draw order: latent noise for every row, then the text sample for every row
        noise = torch.randn(batch, decoder.latent_dim, generator=generator)
        run_end = [_run_end(logits[i], latents_done[i], special, config) if not done[i] else None
                   for i in range(batch)]  # None: text mode, or one more latent
        image_rows = [i for i in range(batch) if not done[i] and latents_done[i] is not None and run_end[i] is None]
        new_latents = torch.zeros(batch, decoder.latent_dim)
        if image_rows:
            cond_hidden = hidden[image_rows]
            if use_cfg:
                cond_hidden = torch.cat([cond_hidden, hidden[[batch + i for i in image_rows]]])
            denoise = decoder.denoise_fn(cond_hidden)
            if use_cfg:
                denoise = classifier_free_guidance(denoise, config.cfg_scale)
            new_latents[image_rows] = dpm_solver_pp_sample(denoise, noise[image_rows].to(decoder.device),
                                                           decoder.alphas_cumprod, decoder.prediction,
                                                           config.diffusion_steps).cpu()
        tokens = sample_tokens(logits[:batch], config, generator, banned=(special.latent, special.eod))

        step_ids, step_is_latent = [], []
        for i in range(batch):
            if done[i]:
                step_ids.append(special.end_of_document)
                step_is_latent.append(False)
                continue
            if latents_done[i] is not None and run_end[i] is None:
                token = special.latent
                current[i].append(new_latents[i])
                latents_done[i] += 1
            elif latents_done[i] is not None:  # the run is complete: close it
                token = special.eod
                samples[i].images.append(torch.stack(current[i]))
                samples[i].run_ends.append(run_end[i])
                current[i], latents_done[i] = [], None
            else:
                token = int(tokens[i])
                if token == special.bod:
                    latents_done[i] = 0
            samples[i].tokens.append(token)
            step_ids.append(token)
            step_is_latent.append(token == special.latent)
            if token == special.end_of_document or (config.stop_after_images is not None
                                                    and len(samples[i].images) >= config.stop_after_images):
                done[i] = True
        if all(done):
            break
        step_ids = torch.tensor(step_ids)
        step_mask = torch.tensor(step_is_latent)
        if use_cfg:  # the unconditional twin is fed exactly what its conditional row generated
            step_ids, step_mask, new_latents = (torch.cat([x, x]) for x in (step_ids, step_mask, new_latents))
        attention = torch.cat([attention, torch.ones(len(rows), 1, dtype=attention.dtype)], dim=1)
        logits, hidden = decoder.step(step_ids[:, None], new_latents[:, None], step_mask[:, None], attention)
    return samples


def _run_end(logits: torch.Tensor, latents_done: int | None, special: SpecialTokens,
             config: SamplingConfig) -> str | None:
    """Whether an open latent run closes now: "max" (its length limit), "eod" (a speech run whose last
    latent's LM head prefers <EOD> over <LATENT>), or None (one more latent; also: not in a run)."""
    if latents_done is None:
        return None
    if config.max_run_latents is None:
        return "max" if latents_done >= special.latents_per_image else None
    if latents_done >= config.max_run_latents:
        return "max"
    if latents_done > 0 and logits[special.eod] > logits[special.latent]:
        return "eod"
    return None


def sample_tokens(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator,
                  banned: Sequence[int] = ()) -> torch.Tensor:
    """Greedy (temperature 0), or temperature + top-p (nucleus) sampling -> ids [b]."""
    logits = logits.float().clone()
    logits[:, list(banned)] = float("-inf")
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= config.top_p  # keeps at least the top token
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------- prompt packing
def _flatten(prompt: Prompt) -> list:
    """Segments -> one item per position: an int id, or a latent vector [D]."""
    flat = []
    for segment in prompt:
        if isinstance(segment, torch.Tensor):
            if segment.dim() != 2:
                raise ValueError(f"a latent segment must be [n, latent_dim], got shape {tuple(segment.shape)}")
            flat.extend(segment.float())
        else:
            flat.append(int(segment))
    if not flat:
        raise ValueError("empty prompt: start it with the end-of-document token")
    return flat


def _open_image_latents(flat: list, special: SpecialTokens):
    """Latents already given after an unclosed <BOD> at the end of the prompt, else None."""
    count = 0
    for item in reversed(flat):
        if isinstance(item, torch.Tensor):
            count += 1
        elif item == special.bod:
            return count
        else:
            return None
    return None


def _left_pad(rows: list[list], latent_dim: int):
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    latents = torch.zeros(len(rows), length, latent_dim)
    latent_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = length - len(row)
        attention[r, offset:] = 1
        for j, item in enumerate(row):
            if isinstance(item, torch.Tensor):
                latents[r, offset + j] = item
                latent_mask[r, offset + j] = True
            else:
                ids[r, offset + j] = item
    return ids, latents, latent_mask, attention
