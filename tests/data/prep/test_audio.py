import math

import numpy as np
import pytest
import soundfile as sf
import torch

from latentlm_mcore.data import schema
from latentlm_mcore.data.prep.audio import load_audio, resample


def _tone(rate, seconds=0.5, freq=440.0, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def test_resample_keeps_a_tone_and_removes_above_nyquist():
    x = torch.from_numpy(_tone(24000, 1.0, 440.0))
    y = resample(x, 24000, 16000)
    assert y.shape == (16000,)
    ref = torch.from_numpy(_tone(16000, 1.0, 440.0))
    err = (y[200:-200] - ref[200:-200]).abs().max()  # edges see the zero padding
    assert err < 5e-3, err
    high = resample(torch.from_numpy(_tone(24000, 1.0, 10000.0)), 24000, 16000)  # above 8 kHz Nyquist
    assert high[200:-200].abs().max() < 0.02


def test_load_audio_mono_resampled_and_segment(tmp_path):
    stereo = np.stack([_tone(22050, 1.0), _tone(22050, 1.0)], 1)
    sf.write(tmp_path / "a.flac", stereo, 22050)
    wav = load_audio(str(tmp_path / "a.flac"), 16000, start=0.25, end=0.75)
    assert wav.dtype == torch.float32 and abs(wav.shape[0] - 8000) <= 1  # 0.25 s at 22.05 kHz is 5512.5 frames


@pytest.mark.parametrize("case, reason", [
    ("missing", schema.AUDIO_MISSING), ("text", schema.AUDIO_UNREADABLE), ("truncated", schema.AUDIO_UNREADABLE),
    ("rate", schema.AUDIO_WRONG_RATE), ("long", schema.AUDIO_TOO_LONG), ("silent", schema.AUDIO_SILENT),
    ("clipped", schema.AUDIO_CLIPPED), ("past_end", schema.AUDIO_UNREADABLE)])
def test_hostile_audio_is_rejected_with_its_reason(tmp_path, case, reason):
    path = tmp_path / "x.wav"
    kwargs = {}
    if case == "text":
        path.write_text("this is not audio\n" * 100)
    elif case == "truncated":
        sf.write(path, _tone(16000), 16000)
        path.write_bytes(path.read_bytes()[:30])
    elif case == "rate":
        sf.write(path, _tone(4000), 4000)
    elif case == "long":
        sf.write(path, _tone(16000, 3.0), 16000)
        kwargs["max_seconds"] = 2.0
    elif case == "silent":
        sf.write(path, np.zeros(16000, np.float32), 16000)
    elif case == "clipped":
        sf.write(path, np.clip(_tone(16000, amp=4.0), -1, 1), 16000)
    elif case == "past_end":
        sf.write(path, _tone(16000, 0.5), 16000)
        kwargs.update(start=0.0, end=2.0)
    with pytest.raises(schema.RejectedDocument) as err:
        load_audio(str(path), 16000, doc_id="doc-7", **kwargs)
    assert err.value.reason == reason and str(path) in str(err.value)
