"""The spoken-digits TTS demo's python parts (scripts/tts_digits_demo.sh; issue 13 item 5): which digits are
generated in which voices, and the report that judges them with the offline recognizer and speaker encoder of
demo/speech_quality.py.

    python -m latentlm_mcore.demo.tts_digits prompts --corpus C --out prompts.json   # prints generate.py args
    python -m latentlm_mcore.demo.tts_digits report --corpus C --vae audio_vae.pt --prompts prompts.json \\
        --generated samples/ --output report.json [--png mel.png]

Voices: each training voice and the held-out voice, prompted with one of its utterances that is not in training
(the training voices' `heldout` split, the held-out voice's own split): the phrase utterance at the middle speed.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

from latentlm_mcore.demo.speech_corpus import DIGITS, HELDOUT_VOICE, SAMPLE_RATE


def read_split(corpus: str, split: str) -> list[dict]:
    """The documents of one corpus split as {text, audio (path relative to corpus), voice, speed}."""
    out = []
    with open(os.path.join(corpus, f"{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                doc = json.loads(line)
                text = next(s["text"] for s in doc["segments"] if "text" in s)
                audio = next(s["audio"] for s in doc["segments"] if "audio" in s)
                out.append({"text": text, "audio": audio, "voice": doc["speaker"],
                            "speed": int(doc["id"].split("-")[-2])})
    return out


def voice_prompts(corpus: str) -> list[dict]:
    """One prompt utterance per voice: a phrase (two or three digits, ~1-2 s) at the middle speed when there is
    one, else the voice's first utterance; never one that training saw."""
    by_voice = {}
    for split in ("heldout", "heldout_voice"):
        for doc in read_split(corpus, split):
            by_voice.setdefault(doc["voice"], []).append(doc)
    prompts = []
    for voice, docs in by_voice.items():
        speeds = sorted({d["speed"] for d in docs})
        middle = speeds[len(speeds) // 2]
        phrases = [d for d in docs if " " in d["text"] and d["speed"] == middle] or docs
        prompts.append({**phrases[0], "heldout_voice": voice == HELDOUT_VOICE})
    return prompts


def generation_plan(corpus: str, texts=DIGITS) -> list[dict]:
    """Every text in every voice: [{text, voice, voice_audio, heldout_voice}], generate.py's batch order."""
    return [{"text": t, "voice": p["voice"], "voice_audio": p["audio"], "heldout_voice": p["heldout_voice"]}
            for p in voice_prompts(corpus) for t in texts]


@torch.no_grad()
def reconstruct(vae, wav: torch.Tensor) -> torch.Tensor:
    """Deterministic σ-VAE reconstruction of one utterance [T] -> [T] (encode μ, decode; no σ noise)."""
    from latentlm_mcore.vae.audio_model import pad_to_hop
    return vae.decode(vae.encode(pad_to_hop(wav, vae.config.hop_length)[None]))[0, :wav.shape[0]].float()


def _accuracy_by_kind(pairs, recognizer) -> dict:
    """Recognizer accuracy on (wav, text) pairs: all, single digits, phrases."""
    from latentlm_mcore.demo.speech_quality import recognizer_accuracy
    kinds = {"all": pairs, "single_digits": [p for p in pairs if " " not in p[1]],
             "phrases": [p for p in pairs if " " in p[1]]}
    return {k: recognizer_accuracy(v, recognizer) for k, v in kinds.items() if v}


def _next_voice(voices: list[str], voice: str) -> str:
    """The "different voice" of a reference pair: the next voice in sorted order."""
    return voices[(voices.index(voice) + 1) % len(voices)]


def pair_similarities(docs: list[dict], wavs, similarity) -> dict:
    """Mean Resemblyzer similarity of real pairs, the references prompt <-> generated is read against. Both
    sets compare the same texts at the same speeds, so only the voice differs between them: each pair is one
    single digit spoken at the slowest speed and the same digit at the fastest (the corpus has one utterance per
    (voice, text, speed), so the two sides of a pair differ in speed), in the same voice (`same_voice`) or in
    the next voice in sorted order (`different_voice`). `docs`: any splits (the judge, not the model, sees
    these); `wavs`: audio path -> waveform (a dict or anything with __getitem__)."""
    by_key = {(d["voice"], d["text"], d["speed"]): d["audio"] for d in docs}
    voices = sorted({d["voice"] for d in docs})
    speeds = sorted({d["speed"] for d in docs})
    slow, fast = speeds[0], speeds[-1]
    same, different = [], []
    for voice in voices:
        other = _next_voice(voices, voice)
        for text in sorted({d["text"] for d in docs if " " not in d["text"]}):
            a = by_key.get((voice, text, slow))
            b_same, b_other = by_key.get((voice, text, fast)), by_key.get((other, text, fast))
            if a is None or b_same is None or b_other is None or other == voice or slow == fast:
                continue  # a pair in one set only would break the match between the sets
            same.append(similarity(wavs[a], wavs[b_same]))
            different.append(similarity(wavs[a], wavs[b_other]))
    return {"design": f"a single digit at {slow} wpm vs the same digit at {fast} wpm, same voice / next voice",
            "same_voice": float(np.mean(same)) if same else None, "same_voice_pairs": len(same),
            "different_voice": float(np.mean(different)) if different else None,
            "different_voice_pairs": len(different)}


def prompt_references(docs: list[dict], plan: list[dict], wavs, similarity) -> dict:
    """For each planned (voice, digit): the voice prompt against the real utterance of that digit at the prompt's
    speed in the prompt's voice (`same_voice`, what a perfect clone of the espeak voice would score) and in the
    next voice (`different_voice`). The same prompt and text as prompt <-> generated: only the utterance differs.
    Grouped by training / held-out voice."""
    by_key = {(d["voice"], d["text"], d["speed"]): d["audio"] for d in docs}
    speed_of = {d["audio"]: d["speed"] for d in docs}
    voices = sorted({d["voice"] for d in docs})
    out = {}
    for p in plan:
        prompt, speed = p["voice_audio"], speed_of[p["voice_audio"]]
        other = _next_voice(voices, p["voice"])
        same, diff = by_key.get((p["voice"], p["text"], speed)), by_key.get((other, p["text"], speed))
        if same is None or diff is None:
            continue
        group = out.setdefault("heldout_voice" if p["heldout_voice"] else "training_voices", {"same": [], "diff": []})
        group["same"].append(similarity(wavs[prompt], wavs[same]))
        group["diff"].append(similarity(wavs[prompt], wavs[diff]))
    return {k: {"same_voice": float(np.mean(v["same"])), "different_voice": float(np.mean(v["diff"])),
                "pairs": len(v["same"])} for k, v in out.items()}


class LazyWavs(dict):
    """audio path (relative to the corpus) -> 16 kHz waveform, read on first use."""

    def __init__(self, corpus: str):
        super().__init__()
        self.corpus = corpus

    def __missing__(self, key):
        from latentlm_mcore.data.prep.audio import load_audio
        self[key] = load_audio(os.path.join(self.corpus, key), SAMPLE_RATE)
        return self[key]


def report(corpus: str, vae_file: str, plan: list[dict], generated: str, png: str | None = None) -> dict:
    """Recognizer accuracy on real / reconstructed / generated speech and speaker similarity; optionally the
    mel-spectrogram PNG (real above generated, one column per digit, in the first training voice)."""
    from latentlm_mcore.data.prep.audio import load_audio, resample
    from latentlm_mcore.demo.speech_quality import DigitRecognizer, SpeakerSimilarity
    from latentlm_mcore.vae.audio_model import load_audio_vae
    from latentlm_mcore.vae.audio_metrics import mean_tokenizer_metrics

    vae = load_audio_vae(vae_file).eval()
    rate = vae.config.sample_rate
    recognizer, similarity = DigitRecognizer(), SpeakerSimilarity()
    docs = read_split(corpus, "heldout") + read_split(corpus, "heldout_voice")
    all_docs = read_split(corpus, "train") + docs  # the similarity references: real audio, any split
    wavs = LazyWavs(corpus)
    real = [(wavs[d["audio"]], d["text"]) for d in docs]
    recon = [(resample(reconstruct(vae, resample(wavs[d["audio"]], SAMPLE_RATE, rate)), rate, SAMPLE_RATE), d["text"])
             for d in docs]
    with open(os.path.join(generated, "speech.json"), encoding="utf-8") as f:
        outputs = json.load(f)
    outputs = outputs.get("samples", outputs) if isinstance(outputs, dict) else outputs
    if len(outputs) != len(plan):
        raise ValueError(f"{generated}/speech.json has {len(outputs)} utterances, the plan {len(plan)}")
    gen = [resample(load_audio(os.path.join(generated, f"{i}.wav"), rate), rate, SAMPLE_RATE)
           for i in range(len(plan))]
    gen_pairs = {"training_voices": [(w, p["text"]) for w, p in zip(gen, plan) if not p["heldout_voice"]],
                 "heldout_voice": [(w, p["text"]) for w, p in zip(gen, plan) if p["heldout_voice"]]}
    prompt_sim = {"training_voices": [], "heldout_voice": []}
    for w, p in zip(gen, plan):
        key = "heldout_voice" if p["heldout_voice"] else "training_voices"
        prompt_sim[key].append(similarity(wavs[p["voice_audio"]], w))
    result = {
        "recognizer": "pocketsphinx en-us, JSGF grammar of the ten digit words",
        "heldout_utterances": len(docs),
        "recognizer_real": _accuracy_by_kind(real, recognizer),
        "recognizer_reconstructed": _accuracy_by_kind(recon, recognizer),
        "tokenizer_metrics": mean_tokenizer_metrics([(r, w) for (w, _), (r, _) in zip(real, recon)], SAMPLE_RATE),
        "recognizer_generated": {k: _accuracy_by_kind(v, recognizer) for k, v in gen_pairs.items() if v},
        "generated_stopped_by_eod": sum(o.get("stopped_by") == "eod" for o in outputs) / len(outputs),
        "generated_seconds_mean": float(np.mean([w.shape[0] / SAMPLE_RATE for w in gen])),
        "speaker_similarity": {
            "prompt_to_generated": {k: float(np.mean(v)) for k, v in prompt_sim.items() if v},
            "prompt_to_real": prompt_references(all_docs, plan, wavs, similarity),
            "real_pairs": pair_similarities(all_docs, wavs, similarity),
            "real_to_reconstructed": float(np.mean([similarity(w, r) for (w, _), (r, _) in zip(real, recon)])),
        },
    }
    if png:
        write_mel_png(png, all_docs, wavs, plan, gen)
    return result


def write_mel_png(path: str, docs, wavs, plan, gen) -> None:
    """Log-mel spectrograms: for each digit, the real utterance of the first planned voice (at its prompt's
    speed, any split) above the generated one."""
    from latentlm_mcore.runtime.files import atomic_write
    from latentlm_mcore.vae.audio_losses import MultiResolutionMelLoss
    from latentlm_mcore.vae.audio_trainer import mel_image

    mel = MultiResolutionMelLoss(SAMPLE_RATE)
    voice = plan[0]["voice"]
    speed = next((d["speed"] for d in docs if d["audio"] == plan[0]["voice_audio"]), None)
    real_by_text = {}
    for d in docs:
        if d["voice"] == voice and d["speed"] == speed:
            real_by_text.setdefault(d["text"], wavs[d["audio"]])
    mels = []
    for w, p in zip(gen, plan):
        if p["voice"] == voice and p["text"] in real_by_text:
            pair = [mel.log_mel(x[None].float(), 512)[0] for x in (real_by_text[p["text"]], w)]
            frames = max(m.shape[1] for m in pair)  # one column per digit: pad the shorter with its quietest value
            mels += [torch.nn.functional.pad(m, (0, frames - m.shape[1]), value=float(m.min())) for m in pair]
    if not mels:  # the held-out split may lack single digits in this voice: the generated ones alone
        mels = [mel.log_mel(w[None].float(), 512)[0] for w, p in zip(gen, plan) if p["voice"] == voice]
        frames = max(m.shape[1] for m in mels)
        mels = [torch.nn.functional.pad(m, (0, frames - m.shape[1]), value=float(m.min())) for m in mels]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        mel_image(mels).save(f, format="png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prompts", help="write the generation plan and print tools/generate.py's --prompt/--voice")
    pp.add_argument("--corpus", required=True)
    pp.add_argument("--out", required=True, help="the plan as JSON (read by `report`)")
    pr = sub.add_parser("report", help="judge generated speech against the real and reconstructed speech")
    pr.add_argument("--corpus", required=True)
    pr.add_argument("--vae", required=True)
    pr.add_argument("--prompts", required=True)
    pr.add_argument("--generated", required=True, help="tools/generate.py --task text-to-speech output folder")
    pr.add_argument("--output", required=True)
    pr.add_argument("--png")
    pr.add_argument("--extra", default="{}", help="JSON merged into the report (settings, timings)")
    args = p.parse_args(argv)
    if args.command == "prompts":
        plan = generation_plan(args.corpus)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(plan, f, indent=1)
        for item in plan:
            print("--prompt", item["text"], "--voice", os.path.join(args.corpus, item["voice_audio"]), sep="\n")
        return
    # OMP_NUM_THREADS when set (the script's 1): on a shared machine two threads of Resemblyzer's small LSTM
    # spend their time in OpenMP barriers waiting for each other
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    with open(args.prompts, encoding="utf-8") as f:
        plan = json.load(f)
    result = {**json.loads(args.extra), **report(args.corpus, args.vae, plan, args.generated, args.png)}
    from latentlm_mcore.runtime.files import atomic_write
    with atomic_write(args.output, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
