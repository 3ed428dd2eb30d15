"""The generation loop's bookkeeping, with a scripted backend whose answers are known:
text tokens from fixed logits, latents from a head whose exact x0 is a function of the hidden state."""
import torch

from latentlm_mcore.diffusion import NoiseSchedule
from latentlm_mcore.inference.generation import (Decoder, SamplingConfig, SpecialTokens, generate, sample_tokens,
                                                 unconditional_prompt)

SPECIAL = SpecialTokens(bod=10, eod=11, latent=12, end_of_document=13, latents_per_image=3)
VOCAB, D = 16, 4


class DeltaHead(torch.nn.Module):
    """Predicts v for a target that is a point mass at `condition`: its exact x0 is the condition."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.schedule = schedule
        self.condition_proj = torch.nn.Linear(1, 1)  # only read for its dtype

    def embed_condition(self, hidden):
        return hidden[:, :D]

    def forward(self, x_t, t, condition):
        x0 = condition
        a, s = self.schedule.coefficients(t, x_t)
        eps = (x_t - a * x0) / s
        return a * eps - s * x0


class ScriptedDecoder(Decoder):
    """Logits always favour `next_token`; the hidden state of a row is its prompt's first id (so
    conditional and unconditional rows differ) and records every step's inputs."""

    def __init__(self, next_token: int):
        schedule = NoiseSchedule(1000, "v")
        super().__init__(DeltaHead(schedule), schedule.alphas_cumprod, "v", D)
        self.next_token = next_token

    def start(self, max_length):
        self.fed = []

    def step(self, input_ids, latents, latent_mask, attention_mask):
        self.fed.append((input_ids.clone(), latents.clone(), latent_mask.clone(), attention_mask.clone()))
        if len(self.fed) == 1:
            first_real = attention_mask.argmax(dim=1)
            self.first_id = input_ids[torch.arange(len(input_ids)), first_real].float()
        logits = torch.zeros(len(input_ids), VOCAB)
        logits[:, self.next_token] = 5.0
        hidden = self.first_id[:, None].expand(-1, 8).clone()
        return logits, hidden


def test_an_image_is_bod_latents_eod_and_guidance_mixes_the_streams():
    decoder = ScriptedDecoder(next_token=3)
    prompts = [[SPECIAL.end_of_document, 1, SPECIAL.bod], [2, 5, 6, 7, SPECIAL.bod]]
    samples = generate(decoder, prompts, SPECIAL, SamplingConfig(cfg_scale=3.0, stop_after_images=1, seed=0),
                       progress=False)
    for prompt, sample in zip(prompts, samples):
        assert sample.tokens == [SPECIAL.latent] * 3 + [SPECIAL.eod]
        assert len(sample.images) == 1 and sample.images[0].shape == (3, D)
        # conditional x0 = first id of the prompt, unconditional x0 = <END_OF_DOCUMENT>: guidance gives
        # uncond + 3 * (cond - uncond), exactly (DPM-Solver++ is exact for a constant x0 prediction)
        expected = SPECIAL.end_of_document + 3.0 * (prompt[0] - SPECIAL.end_of_document)
        assert torch.allclose(sample.images[0], torch.full((3, D), expected), atol=1e-4)
    # the unconditional twins (rows 2, 3) are fed exactly what their conditional rows generated
    first = decoder.fed[0]
    assert first[0].shape[0] == 4 and first[3][2:].sum(1).tolist() == [2, 2]  # <END_OF_DOCUMENT> <BOD>
    for ids, latents, latent_mask, _ in decoder.fed[1:]:
        assert torch.equal(ids[:2], ids[2:]) and torch.equal(latents[:2], latents[2:])
        assert torch.equal(latent_mask[:2], latent_mask[2:])
    assert len(decoder.fed) == 4  # prefill + 3 latents fed back; <EOD> ends the rows, nothing more is run


def test_text_mode_opens_images_and_stops_at_end_of_document():
    decoder = ScriptedDecoder(next_token=SPECIAL.bod)
    sample = generate(decoder, [[SPECIAL.end_of_document, 1]], SPECIAL,
                      SamplingConfig(max_new_tokens=9, temperature=0.0), progress=False)[0]
    bod, lat, eod = SPECIAL.bod, SPECIAL.latent, SPECIAL.eod
    assert sample.tokens == [bod, lat, lat, lat, eod, bod, lat, lat, lat]
    assert len(sample.images) == 1  # the second image is still open when max_new_tokens runs out
    assert decoder.fed[0][0].shape[0] == 1  # cfg_scale 1: no unconditional stream

    decoder = ScriptedDecoder(next_token=SPECIAL.end_of_document)
    sample = generate(decoder, [[SPECIAL.end_of_document, 1]], SPECIAL, SamplingConfig(max_new_tokens=9),
                      progress=False)[0]
    assert sample.tokens == [SPECIAL.end_of_document]


def test_a_prompt_may_end_inside_an_image():
    decoder = ScriptedDecoder(next_token=3)
    given = torch.randn(2, D)
    prompt = [SPECIAL.end_of_document, 1, SPECIAL.bod, given]
    sample = generate(decoder, [prompt], SPECIAL, SamplingConfig(stop_after_images=1, cfg_scale=2.0),
                      progress=False)[0]
    assert sample.tokens == [SPECIAL.latent, SPECIAL.eod]  # 3 latents per image, 2 were given
    uncond = unconditional_prompt(prompt, SPECIAL)
    assert uncond[:2] == [SPECIAL.end_of_document, SPECIAL.bod] and torch.equal(uncond[2], given)
    assert unconditional_prompt([SPECIAL.end_of_document, 1, 2], SPECIAL) == [SPECIAL.end_of_document]


def test_sample_tokens_greedy_top_p_and_banned():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert sample_tokens(logits, SamplingConfig(temperature=0.0), g).item() == 0
    assert sample_tokens(logits, SamplingConfig(temperature=0.0), g, banned=[0]).item() == 1
    draws = torch.cat([sample_tokens(logits, SamplingConfig(top_p=0.7), g) for _ in range(400)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7: the tail is cut
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.08
    draws = torch.cat([sample_tokens(logits, SamplingConfig(), g) for _ in range(400)])
    assert set(draws.tolist()) == {0, 1, 2, 3}


class SpeechDecoder(ScriptedDecoder):
    """The LM head prefers <LATENT> over <EOD> until a row has been fed `stop_after[row]` latents after
    the prompt (None: never); text logits favour token 3 throughout."""

    def __init__(self, stop_after):
        super().__init__(next_token=3)
        self.stop_after = stop_after

    def step(self, input_ids, latents, latent_mask, attention_mask):
        logits, hidden = super().step(input_ids, latents, latent_mask, attention_mask)
        fed = torch.stack([m for _, _, m, _ in self.fed[1:]], dim=1).sum((1, 2)) if len(self.fed) > 1 else None
        for row in range(len(input_ids)):
            stop = self.stop_after[row % len(self.stop_after)]
            count = 0 if fed is None else int(fed[row])
            logits[row, SPECIAL.latent], logits[row, SPECIAL.eod] = (1.0, 2.0) if stop is not None and \
                count >= stop else (2.0, 1.0)
        return logits, hidden


def test_speech_runs_stop_where_the_lm_head_prefers_eod_or_at_the_max():
    from latentlm_mcore.inference.generation import speech_prompts

    voices = [torch.randn(2, D), torch.randn(3, D), torch.randn(1, D)]
    prompts, uncond = speech_prompts([[1, 2], [4], [5, 6, 7]], voices, SPECIAL)
    assert prompts[0][:4] == [SPECIAL.end_of_document, SPECIAL.bod, voices[0], SPECIAL.eod]
    assert prompts[0][4:] == [1, 2, SPECIAL.bod] and uncond[0][4:] == [SPECIAL.bod]  # no text: guidance's stream
    decoder = SpeechDecoder(stop_after=[2, None, 5])
    sampling = SamplingConfig(cfg_scale=4.0, stop_after_images=1, max_run_latents=4, max_new_tokens=20)
    samples = generate(decoder, prompts, SPECIAL, sampling, uncond_prompts=uncond, progress=False)
    lat, eod = SPECIAL.latent, SPECIAL.eod
    assert samples[0].tokens == [lat, lat, eod] and samples[0].run_ends == ["eod"]  # prefers <EOD> after 2
    assert samples[1].tokens == [lat] * 4 + [eod] and samples[1].run_ends == ["max"]  # never: the max of 4
    assert samples[2].tokens == [lat] * 4 + [eod] and samples[2].run_ends == ["max"]  # would stop at 5: max first
    assert [s.images[0].shape[0] for s in samples] == [2, 4, 4]
    # a row that stopped is fed no more latents while the others continue; the unconditional twins follow
    for ids, latents, latent_mask, _ in decoder.fed[1:]:
        assert torch.equal(latent_mask[:3], latent_mask[3:])
    assert [bool(m[0, 0]) for _, _, m, _ in decoder.fed[1:]] == [True, True, False, False]
    assert len(decoder.fed) == 5  # prefill + 4 latents; then every row closes its run


def test_the_first_latent_of_a_speech_run_is_always_generated():
    decoder = SpeechDecoder(stop_after=[0])  # prefers <EOD> from the start, even at <BOD>
    prompt = [SPECIAL.end_of_document, SPECIAL.bod, torch.randn(2, D), SPECIAL.eod, 1, SPECIAL.bod]
    sample = generate(decoder, [prompt], SPECIAL, SamplingConfig(stop_after_images=1, max_run_latents=6),
                      progress=False)[0]
    assert sample.tokens == [SPECIAL.latent, SPECIAL.eod] and sample.run_ends == ["eod"]
