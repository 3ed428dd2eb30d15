"""Public formats -> the raw JSONL that tools/preprocess_interleaved.py reads (DESIGN §4).

    python data_prep/convert.py text       --input 'books/*.txt' 'web/*.jsonl'          --output text.jsonl
    python data_prep/convert.py webdataset --input 'pairs/{00000..00099}.tar' --image-root images --output pairs.jsonl
    python data_prep/convert.py obelics    --input 'obelics/*.parquet' --image-root images [--url-map urls.jsonl] --output obelics.jsonl
    python data_prep/convert.py mmc4       --input 'mmc4/*.jsonl' --image-root images [--url-map urls.jsonl] --output mmc4.jsonl
    python data_prep/convert.py imagefolder --input /data/imagenet/train [--class-index imagenet_class_index.json] --output imagenet.jsonl
    python data_prep/convert.py librispeech --input LibriSpeech/train-clean-100 --output speech.jsonl
    python data_prep/convert.py libriheavy  --input 'libriheavy/*.jsonl' --output speech.jsonl

imagefolder: one class-labelled image per file of <input>/<class folder>/ (ImageNet's train/<wnid>/*.JPEG);
labels from --class-index (ImageNet's imagenet_class_index.json or {"folder": label}), by default the sorted
folder names -> 0..N-1; image paths relative to --image-root (default: the input folder).

Nothing is downloaded: images inside the input are written under --image-root, images given by URL must
already be there (--url-map: JSONL lines {"url": ..., "path": path relative to the image root}).
Prints what was written and what was skipped, by reason.
"""

import argparse
import glob
import json
from collections import Counter

from latentlm_mcore.data.prep import convert, convert_speech


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=("text", "webdataset", "obelics", "mmc4", "imagefolder", "librispeech",
                                      "libriheavy"))
    p.add_argument("--input", nargs="+", required=True, help="files or globs")
    p.add_argument("--output", required=True, help="raw JSONL to write")
    p.add_argument("--image-root", help="where images live / are extracted to (not for text)")
    p.add_argument("--url-map", help="obelics/mmc4: JSONL of {url, path} for images downloaded beforehand")
    p.add_argument("--class-index", help="imagefolder: JSON class index (default: sorted folder names -> 0..N-1)")
    args = p.parse_args(argv)
    paths = sorted({f for pattern in args.input for f in (glob.glob(pattern) or [pattern])})
    if args.format == "imagefolder" and len(paths) != 1:
        p.error(f"imagefolder takes one folder as --input, got {len(paths)}")
    if args.format in ("webdataset", "obelics", "mmc4") and not args.image_root:
        p.error(f"{args.format} needs --image-root")

    skipped = Counter()
    if args.format == "text":
        docs = convert.convert_text(paths, skipped)
    elif args.format == "webdataset":
        docs = convert.convert_webdataset(paths, args.image_root, skipped)
    elif args.format == "imagefolder":
        index = convert.load_class_index(args.class_index) if args.class_index else None
        docs = convert.convert_imagefolder(paths[0], skipped, index, args.image_root)
    elif args.format == "librispeech":
        docs = convert_speech.convert_librispeech(paths, skipped)
    elif args.format == "libriheavy":
        docs = convert_speech.convert_libriheavy(paths, skipped)
    elif args.format == "obelics":
        docs = convert.convert_obelics(paths, args.image_root, skipped, convert.load_url_map(args.url_map))
    else:
        docs = convert.convert_mmc4(paths, args.image_root, skipped, convert.load_url_map(args.url_map))
    written = convert.write_jsonl(docs, args.output)
    print(json.dumps({"output": args.output, "documents": written, "skipped": dict(skipped)}))


if __name__ == "__main__":
    main()
