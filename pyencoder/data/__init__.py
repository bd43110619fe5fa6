"""Bundled data: a short English speech clip (espeak-ng, 16 kHz mono 16-bit) for the demo."""
import os
import wave

import torch

SPEECH_16K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speech_16k.wav")


def load_speech():
    """The bundled clip as a float32 tensor (samples,) in [-1, 1] and its sample rate."""
    with wave.open(SPEECH_16K, "rb") as w:
        sr, n, width = w.getframerate(), w.getnframes(), w.getsampwidth()
        raw = w.readframes(n)
    if width != 2:
        raise ValueError(f"{SPEECH_16K}: expected 16-bit samples; got {8 * width}-bit")
    x = torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.float32) / 32768.0
    return x, sr
