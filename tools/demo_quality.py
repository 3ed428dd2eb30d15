"""Quality report of the quickstart model (latentlm_mcore/demo/quality.py): do generated digits show the digit
their caption asks for, do generated captions name the digit in the image, and how far the held-out text loss
fell from initialisation.

    python tools/demo_quality.py --corpus runs/quickstart/corpus --hf runs/quickstart/hf \\
        --text-to-image runs/quickstart/samples/text_to_image --image-to-text runs/quickstart/samples/image_to_text \\
        --output runs/quickstart/quality.json

    python tools/demo_quality.py --corpus runs/quickstart/corpus --heldout-examples   # one held-out digit per class
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlm_mcore.runtime.logs import install_warning_filters  # noqa: E402
install_warning_filters()  # first: known-benign library warnings once or not at all (LATENTLM_VERBOSE=1: all)

from latentlm_mcore.demo import quality  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="folder written by data_prep/demo_corpus.py")
    p.add_argument("--heldout-examples", action="store_true",
                   help="only print one held-out digit image per class, one path a line, and exit")
    p.add_argument("--hf", help="folder written by tools/convert_ckpt_to_hf.py (held-out text loss)")
    p.add_argument("--text-to-image", help="tools/generate.py --task text-to-image output folder")
    p.add_argument("--image-to-text", help="tools/generate.py --task image-to-text output folder")
    p.add_argument("--output", help="write the report here as JSON")
    args = p.parse_args(argv)
    if args.heldout_examples:
        print("\n".join(quality.heldout_examples(args.corpus)))
        return

    report = {}
    if args.text_to_image:
        classifier = quality.DigitClassifier.for_corpus(args.corpus)
        report["classifier_heldout_real_accuracy"] = classifier.heldout_accuracy
        report["text_to_image"] = quality.text_to_image_accuracy(classifier, args.text_to_image)
        print(f"text -> image: {100 * report['text_to_image']['accuracy']:.1f}% of "
              f"{report['text_to_image']['images']} generated digits are the requested digit "
              f"(the classifier reads {100 * classifier.heldout_accuracy:.1f}% of "
              f"{classifier.heldout_count} held-out real digits right)")
    if args.image_to_text:
        report["image_to_text"] = quality.image_to_text_accuracy(args.corpus, args.image_to_text)
        print(f"image -> text: {100 * report['image_to_text']['accuracy']:.1f}% of "
              f"{report['image_to_text']['captions']} captions of held-out digits name the right digit")
    if args.hf:
        report["heldout_text_loss"] = loss = quality.heldout_text_loss(args.hf, args.corpus)
        print(f"held-out text: LM loss {loss['start']:.3f} at initialisation -> {loss['end']:.3f} trained "
              f"(perplexity {loss['start_ppl']:,.0f} -> {loss['end_ppl']:,.1f}; {loss['tokens']:,} tokens)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
