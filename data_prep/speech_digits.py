"""Build the spoken-digits corpus of the TTS demo (espeak-ng voices and speeds; see demo/speech_corpus.py).

    python data_prep/speech_digits.py --out runs/speech_digits [--phrases 30]
"""

import argparse
import json

from latentlm_mcore.demo.speech_corpus import build_speech_corpus


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for audio/ and the train / heldout / heldout_voice JSONL")
    p.add_argument("--phrases", type=int, default=30, help="digit phrases besides the ten single digits")
    args = p.parse_args(argv)
    print(json.dumps({"out": args.out, "documents": build_speech_corpus(args.out, phrases=args.phrases)}))


if __name__ == "__main__":
    main()
