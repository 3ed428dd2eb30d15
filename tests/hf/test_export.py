"""Megatron checkpoint -> Hugging Face folder, checked against the Megatron model itself.

One module fixture builds everything once (each launch costs 10-30 s on two shared cores):
a tiny GQA LatentLM saved at TP=2 with its Megatron outputs, the same checkpoint resharded to TP=1,
`hf_tp1` (converted in-process) and `hf_tp2` (converted by the CLI, sharded), a bf16 export, megatron's
KV cache vs recompute, and a `tools/generate.py` text -> image run on the Megatron checkpoint.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentlm_mcore.hf  # noqa: F401  (transformers beside an unloadable torchvision)
from latentlm_mcore.data.tokenizer import TiktokenTokenizer, write_tiktoken_file
from latentlm_mcore.inference.generation import SamplingConfig
from latentlm_mcore.inference.tasks import Generator
from latentlm_mcore.vae import SIGMA_VAE_PRESETS, LatentStats, SigmaVAE, load_sigma_vae, save_sigma_vae
from tests.conftest import REPO, run_torchrun
from tests.data.test_tokenizer import small_bpe_ranks

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

WORKER = Path(__file__).with_name("checkpoint_worker.py")
CAPTIONS = ["a red cat", "the green grass near a blue lake"]
T2I = dict(cfg_scale=2.0, diffusion_steps=10, seed=7)


def run_tool(tool: str, args: list[str], tmp: Path) -> str:
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    (out / "tmp").mkdir()
    write_tiktoken_file(small_bpe_ranks("a photo of a red cat sitting on the green grass near a blue lake " * 10, 40),
                        out / "small.tiktoken")
    torch.manual_seed(0)
    vae = SigmaVAE(SIGMA_VAE_PRESETS["tiny"])
    save_sigma_vae(out / "vae.pt", vae, LatentStats(torch.rand(16) - 0.5, torch.rand(16) + 0.5))
    common = ["--out", str(out), "--tokenizer", str(out / "small.tiktoken"), "--sigma-vae", str(out / "vae.pt")]
    run_torchrun(WORKER, 2, ["--phase", "save", *common], out)
    run_torchrun(WORKER, 1, ["--phase", "reshard", *common], out)
    run_tool("convert_ckpt_to_hf.py", ["--checkpoint", str(out / "ckpt_tp2"), "--output", str(out / "hf_tp2"),
                                       "--max-shard-size", "300KB"], out / "tmp")
    run_tool("generate.py", ["--checkpoint", str(out / "ckpt_tp2"), "--task", "text-to-image",
                             *[a for c in CAPTIONS for a in ("--prompt", c)], "--output", str(out / "gen_megatron"),
                             "--cfg-scale", str(T2I["cfg_scale"]), "--diffusion-steps", str(T2I["diffusion_steps"]),
                             "--seed", str(T2I["seed"])], out / "tmp")
    return out


def load_hf(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


def test_folder_is_self_contained_and_complete(out):
    folder = out / "hf_tp2"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_latentlm.LatentLMForCausalLM"
    assert config["num_key_value_heads"] == 2 and config["latents_per_image"] == 16
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1  # sharded
    for name in ("generation_config.json", "tokenizer.json", "sigma_vae.safetensors", "sigma_vae.json", "README.md"):
        assert (folder / name).is_file(), name
    for code in folder.glob("*.py"):  # the remote code runs without this package
        assert "import latentlm_mcore" not in code.read_text() and "from latentlm_mcore" not in code.read_text(), code


def test_logits_and_diffusion_head_match_megatron(out):
    """Megatron at TP=2 (logits gathered over TP) vs the HF export loaded by AutoModelForCausalLM."""
    ref = torch.load(out / "megatron_outputs.pt")
    ids, latents, latent_mask, x_t, t = ref["inputs"]
    model = load_hf(out / "hf_tp2")
    assert type(model).__name__ == "LatentLMForCausalLM"
    with torch.no_grad():
        hf = model(input_ids=ids, latents=latents, latent_mask=latent_mask)
        head_out = model.diffusion_head(x_t, t, model.diffusion_head.embed_condition(hf.last_hidden_state[1, 7:12]))
    logits_diff = (hf.logits - ref["logits"]).abs().max().item()
    rel = logits_diff / ref["logits"].abs().max().item()
    head_diff = (head_out - ref["head_out"]).abs().max().item()
    print(f"\nPARITY logits max abs {logits_diff:.3e} (rel {rel:.3e}), hidden max abs "
          f"{(hf.last_hidden_state - ref['hidden']).abs().max().item():.3e}, head max abs {head_diff:.3e}")
    assert logits_diff < 1e-4
    assert head_diff < 1e-4 and ref["head_out"].abs().max() > 0.1  # the head computes something


def test_text_part_loads_as_plain_llama(out):
    from transformers import LlamaForCausalLM

    ref = torch.load(out / "megatron_outputs.pt")
    llama = LlamaForCausalLM.from_pretrained(out / "hf_tp2").eval()
    with torch.no_grad():
        logits = llama(input_ids=ref["inputs"][0][:1]).logits  # row 0 has no latents
    assert (logits - ref["logits"][:1]).abs().max() < 1e-4


def test_tp2_conversion_equals_tp1_conversion(out):
    from safetensors.torch import load_file

    def tensors(folder):
        merged = {}
        for f in sorted(Path(folder).glob("model*.safetensors")):
            merged.update(load_file(f))
        return merged

    tp1, tp2 = tensors(out / "hf_tp1"), tensors(out / "hf_tp2")
    assert tp1.keys() == tp2.keys() and any(k.startswith("diffusion_head.") for k in tp1)
    worst = max((tp1[k] - tp2[k]).abs().max().item() for k in tp1)
    print(f"\nPARITY TP=2 vs TP=1 conversion max abs diff {worst:.3e} over {len(tp1)} tensors")
    assert worst == 0.0


def test_bf16_export(out):
    ref = torch.load(out / "megatron_outputs.pt")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "hf_bf16" / "model.safetensors").values()} == {torch.bfloat16}
    model = load_hf(out / "hf_bf16", dtype="auto")
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids, latents, latent_mask, _, _ = ref["inputs"]
    with torch.no_grad():
        logits = model(input_ids=ids, latents=latents, latent_mask=latent_mask).logits.float()
    assert (logits - ref["logits"]).abs().max() < 0.05


def test_tokenizer_and_sigma_vae_travel_with_the_export(out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "hf_tp2")
    ours = TiktokenTokenizer(out / "small.tiktoken")
    text = "a photo of a red cat, sitting near the lake! 1234567 Ünïcödé's <BOD><|endoftext|>\n\n  x  \n"
    assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    assert tok.convert_tokens_to_ids(list(ours.special_ids)) == list(ours.special_ids.values())

    model = load_hf(out / "hf_tp2")
    exported, original = model.load_sigma_vae(), load_sigma_vae(out / "vae.pt")
    assert torch.equal(exported.latent_stats.std, original.latent_stats.std)
    z = torch.randn(2, 16, 16)
    assert torch.equal(exported.decode(z), original.decode(z))


def test_converter_refuses_bad_input_with_clear_errors(out):
    from latentlm_mcore.hf.convert import convert_checkpoint

    with pytest.raises(FileExistsError, match="hf_tp2 exists"):
        convert_checkpoint(str(out / "ckpt_tp2"), str(out / "hf_tp2"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        convert_checkpoint(str(out / "nowhere"), str(out / "hf_new"))
    with pytest.raises(FileNotFoundError, match="iter_0000009: missing or incomplete"):
        convert_checkpoint(str(out / "ckpt_tp2"), str(out / "hf_new"), iteration=9)
    broken = json.loads((out / "broken_error.json").read_text())["error"]
    assert "incomplete checkpoint" in broken and ".distcp" in broken, broken
    assert not (out / "hf_new").exists()


def _png(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(int)


def test_hf_generation_equals_megatron_generation(out):
    """Same seed, same prompts: the HF folder (transformers' DynamicCache) and tools/generate.py on the
    Megatron TP=2 checkpoint (megatron's StaticInferenceContext) give the same tokens and images."""
    megatron = json.loads((out / "gen_megatron" / "samples.json").read_text())
    generations = Generator.from_hf_folder(str(out / "hf_tp2")).text_to_image(CAPTIONS, SamplingConfig(**T2I))
    for i, (g, m) in enumerate(zip(generations, megatron)):
        assert g.tokens == m["tokens"] and len(g.images) == 1
        png = np.asarray(Image.open(out / "gen_megatron" / "images" / f"{i:03d}.png")).astype(int)
        assert png.shape == (32, 32, 3)
        assert np.abs(_png(g.images[0]) - png).max() <= 1  # uint8 rounding of equal floats
    assert (out / "gen_megatron" / "grid.png").is_file()


def test_kv_cache_equals_recompute_and_batching(out):
    cached = Generator.from_hf_folder(str(out / "hf_tp2"))
    recompute = Generator.from_hf_folder(str(out / "hf_tp2"), use_cache=False)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1)
    a, b = cached.continue_text(CAPTIONS, sampling), recompute.continue_text(CAPTIONS, sampling)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    a, b = (g.text_to_image(CAPTIONS, SamplingConfig(**T2I)) for g in (cached, recompute))
    assert all((x.images[0] - y.images[0]).abs().max() < 1e-5 for x, y in zip(a, b))
    # left padding: a prompt decoded in a batch with a longer one equals it decoded alone (greedy text)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    batched = cached.continue_text(CAPTIONS, greedy)
    alone = [cached.continue_text([c], greedy)[0] for c in CAPTIONS]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]


def test_megatron_kv_cache_equals_recompute(out):
    """megatron's StaticInferenceContext (CPU, local layers) against recomputing the prefix."""
    record = json.loads((out / "megatron_kv_cache.json").read_text())
    assert record["tokens"] == record["recomputed_tokens"]
    tok = TiktokenTokenizer(out / "small.tiktoken")
    assert record["tokens"][0][:17] == [tok.latent_id] * 16 + [tok.eod_id]  # 16 latents, then <EOD>
    print(f"\nPARITY megatron KV cache vs recompute: max latent diff {record['max_latent_diff']:.3e}")
    assert record["max_latent_diff"] < 1e-4


def test_generate_cli_image_to_text_from_hf_folder(out):
    image = out / "gen_megatron" / "images" / "000.png"
    run_tool("generate.py", ["--hf", str(out / "hf_tp2"), "--task", "image-to-text", "--image", str(image),
                             "--temperature", "0", "--max-new-tokens", "6", "--output", str(out / "gen_i2t")],
             out / "tmp")
    record = json.loads((out / "gen_i2t" / "samples.json").read_text())[0]
    generator = Generator.from_hf_folder(str(out / "hf_tp2"))
    pixels = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    expected = generator.image_to_text(pixels[None], SamplingConfig(max_new_tokens=6, temperature=0.0))[0]
    assert record["tokens"] == expected.tokens and len(record["tokens"]) == 6


def test_model_card_usage_generate_mixed_and_plain_text_generate(out):
    """What the model card shows: `generate_mixed` + the shipped σ-VAE; and `generate()` for text."""
    from transformers import AutoTokenizer

    model, tok = load_hf(out / "hf_tp2"), AutoTokenizer.from_pretrained(out / "hf_tp2")
    c = model.config
    prompt = [c.end_of_document_token_id, *tok.encode(CAPTIONS[0], add_special_tokens=False), c.bod_token_id]
    sample = model.generate_mixed([prompt], stop_after_images=1, max_new_tokens=c.latents_per_image + 1,
                                  progress=False, **T2I)[0]
    vae = model.load_sigma_vae()
    image = vae.decode(vae.latent_stats.unscale(sample.images[0][None]))[0]
    expected = Generator.from_hf_folder(str(out / "hf_tp2")).text_to_image(CAPTIONS[:1], SamplingConfig(**T2I))[0]
    assert (image.clamp(-1, 1) - expected.images[0]).abs().max() < 1e-5

    ids = torch.tensor([prompt[:-1]])
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:]
    greedy = ids
    with torch.no_grad():
        for _ in range(5):  # the same greedy decoding without cache
            greedy = torch.cat([greedy, model(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == greedy[0, ids.shape[1]:].tolist()


def test_export_runs_on_transformers_4_and_5(out, tmp_path):
    """The same user script (transformers_worker.py) on .venv's transformers 4.x and on 5.x, installed by
    scripts/setup_env.sh to a --target directory beside the venv and used only here (PYTHONPATH)."""
    target = Path(sys.prefix) / "transformers-5"
    if not (target / "transformers").is_dir():
        pytest.fail(f"{target} is missing: scripts/setup_env.sh installs transformers 5 there for this test")
    results = {}
    for name, extra in (("4", {}), ("5", {"PYTHONPATH": str(target)})):
        env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", **extra)
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("transformers_worker.py")),
                               str(out / "hf_tp2"), str(tmp_path / f"{name}.pt")], env=env, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"transformers {name}:\n{proc.stderr[-5000:]}"
        results[name] = torch.load(tmp_path / f"{name}.pt")
    v4, v5 = results["4"], results["5"]
    assert v4["version"].startswith("4.") and v5["version"].startswith("5."), (v4["version"], v5["version"])
    print(f"\ntransformers {v4['version']} and {v5['version']}: same tokens, image max abs diff "
          f"{(v4['image'] - v5['image']).abs().max().item():.2e}")
    ours = TiktokenTokenizer(out / "small.tiktoken")
    for r in (v4, v5):
        assert r["model_class"] == "LatentLMForCausalLM" and r["asked"] == 0  # no interactive prompt
        assert r["caption"] == ours.encode("a red cat")
        assert len(r["t2i_tokens"]) == 17 and len(r["i2t_tokens"]) == 6 and len(r["text"]) == 5
    for key in ("t2i_tokens", "i2t_tokens", "text"):
        assert v4[key] == v5[key], key
    assert (v4["image"] - v5["image"]).abs().max() < 1e-5
    # and 4.x equals the in-process reference path (Generator over the same folder)
    expected = Generator.from_hf_folder(str(out / "hf_tp2")).text_to_image(CAPTIONS[:1], SamplingConfig(**T2I))[0]
    assert (v4["image"].clamp(-1, 1) - expected.images[0]).abs().max() < 1e-5


def test_export_and_generation_survive_moved_dataset_and_sigma_vae_folders(out, tmp_path):
    """The checkpoint's σ-VAE is found by its sha256 (its copy beside the checkpoint) once the recorded
    folders are gone; with no copy left, the error says what to pass."""
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(out / "ckpt_tp2", moved)
    assert len(list(moved.glob("sigma_vae-*.pt"))) == 1
    run_config = moved / "iter_0000001" / "run_config.json"
    payload = json.loads(run_config.read_text())
    payload["provenance"].update(sigma_vae_path=str(tmp_path / "gone" / "vae.pt"), dataset=str(tmp_path / "gone"))
    run_config.write_text(json.dumps(payload))
    run_tool("convert_ckpt_to_hf.py", ["--checkpoint", str(moved), "--output", str(tmp_path / "hf")], out / "tmp")
    exported = load_hf(tmp_path / "hf").load_sigma_vae()
    original = load_sigma_vae(out / "vae.pt")
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    run_tool("generate.py", ["--checkpoint", str(moved), "--task", "text-to-image", "--prompt", CAPTIONS[0],
                             "--output", str(tmp_path / "gen"), "--diffusion-steps", "2"], out / "tmp")
    assert (tmp_path / "gen" / "images" / "000.png").is_file()
    for copy in moved.glob("sigma_vae-*.pt"):  # nothing left with that hash: the error says what to pass
        copy.unlink()
    with pytest.raises(AssertionError, match="no σ-VAE with sha256.*pass --sigma-vae"):
        run_tool("convert_ckpt_to_hf.py", ["--checkpoint", str(moved), "--output", str(tmp_path / "hf2")], out / "tmp")


def test_class_to_image_hf_equals_megatron_with_the_null_class_in_the_batch(out):
    """Class -> image on both backends, the same checkpoint read with a class vocabulary (classes:10: ids 0..9,
    <NULL_CLASS> 10): same tokens and images; the unconditional stream is the null class (guidance on)."""
    from latentlm_mcore.inference.generation import class_prompts

    run_tool("convert_ckpt_to_hf.py", ["--checkpoint", str(out / "ckpt_tp2"), "--output", str(out / "hf_classes"),
                                       "--tokenizer", "classes:10"], out / "tmp")
    config = json.loads((out / "hf_classes" / "config.json").read_text())
    assert (config["num_classes"], config["null_class_token_id"], config["bod_token_id"]) == (10, 10, 11)
    assert not (out / "hf_classes" / "tokenizer.json").exists()  # class ids need no text tokenizer
    run_tool("generate.py", ["--checkpoint", str(out / "ckpt_tp2"), "--tokenizer", "classes:10", "--task",
                             "class-to-image", "--class", "3", "--class", "7", "--output", str(out / "cls_megatron"),
                             "--cfg-scale", "2.0", "--diffusion-steps", "10", "--seed", "7"], out / "tmp")
    megatron = json.loads((out / "cls_megatron" / "samples.json").read_text())
    generator = Generator.from_hf_folder(str(out / "hf_classes"))
    assert generator.classes == (10, 10)
    generations = generator.class_to_image([3, 7], SamplingConfig(cfg_scale=2.0, diffusion_steps=10, seed=7))
    for i, (g, m) in enumerate(zip(generations, megatron)):
        assert g.tokens == m["tokens"] and len(g.images) == 1 and m["prompt"] == f"class {[3, 7][i]}"
        png = np.asarray(Image.open(out / "cls_megatron" / "images" / f"{i:03d}.png")).astype(int)
        assert np.abs(_png(g.images[0]) - png).max() <= 1
    # the exported folder alone: generate_classes gives the same latents as the Generator
    model = load_hf(str(out / "hf_classes"))
    samples = model.generate_classes([3, 7], cfg_scale=2.0, diffusion_steps=10, seed=7, progress=False)
    vae = model.load_sigma_vae()
    with torch.no_grad():
        pixels = vae.decode(vae.latent_stats.unscale(samples[1].images[0][None])).float().clamp(-1, 1)[0]
    assert torch.allclose(pixels, generations[1].images[0], atol=1e-5)
    # guidance changes the image: the null-class stream is really in the batch
    unguided = generator.class_to_image([3, 7], SamplingConfig(cfg_scale=1.0, diffusion_steps=10, seed=7))
    assert not torch.allclose(unguided[0].images[0], generations[0].images[0])
    special = model.special_tokens()
    assert class_prompts([3], special, 10, 10) == ([[3, 11]], [[10, 11]])
    with pytest.raises(ValueError, match="class 10 is not one of the model's 10 classes"):
        generator.class_to_image([10], SamplingConfig())
