"""What help shows beyond each command's own declarations: the root's panels and every command's examples.

One place for both: ``kaapcli CMD --help`` ends with the command's examples (attached when its module is loaded,
so ``kaapcli --help`` never imports a command module), ``make docs`` writes the panels into the generated table
``_commands.py`` (the root ``--help`` groups by them) and both into the man page.  A test parses every example
with click against the real command, so a renamed option breaks it, and checks the README's command table is
grouped the same way.

The examples run as written against one data layout, the README's and the docs' (``LAYOUT``).
"""

from __future__ import annotations

# what the examples' names stand for (the commands making each part are among the examples)
LAYOUT: list[tuple[str, str]] = [
    ("ct/", "a DICOM CT study (kaapcli mock -o ct)"),
    ("nifti/", "its volume nifti/ct.nii.gz (kaapcli convert ct -o nifti --layout ct)"),
    ("masks/", "NIfTI masks <stem>--<label>--<name>.nii.gz on that grid, a segmentation's output "
               "(examples/threshold.py nifti/ct.nii.gz -o masks writes one)"),
    ("seg/", "DICOM SEG objects of ct/ (kaapcli itk2seg masks -r ct -o seg)"),
    ("meta/", "Kaapana meta JSON of ct/ (kaapcli dcm2json ct -o meta)"),
    ("ORTHANC@pacs:4242, http://pacs:8042", "a PACS: DIMSE, and DICOMweb under /dicom-web"),
    ("the index", "the default embedded one (unless --index names another), holding ct/ (kaapcli index ct)"),
    ("runs/", "run folders (kaapcli trigger ct --rules rules.json -o runs)"),
    ("key, rules.json, node.toml, report.pdf, reports/, model.zip",
     "your own files: a secret key on one line, a rules file, a config file, PDFs, any file to carry"),
]

# panel title -> commands, in the order of the README's command table
PANELS: dict[str, list[str]] = {
    "Files": ["mock", "dcm2json", "modify", "sort", "anonymize", "phi-scan", "pdf2dcm", "dcm2pdf", "bin2dcm",
              "dcm2bin", "json2sr", "concat-json", "zip", "unzip", "split", "clean"],
    "Imaging": ["convert", "itk2dcm", "itk2seg", "seg2itk", "merge-masks", "resample", "radiomics", "thumbnail"],
    "Network": ["echo", "send", "receive", "query", "retrieve", "delete"],
    "Index": ["index", "unindex", "search", "tag", "dataset", "stats", "gallery", "dashboard", "s3"],
    "Pipelines": ["rules", "trigger", "runs", "watch", "collect", "worker"],
    "Setup": ["config"],
}

# command path -> [(command line, what it does)]: two or three per command that runs (a group that runs
# without a subcommand, as `runs` lists the journal, is one)
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "mock": [
        ("kaapcli mock -o ct --slices 300 --seed 1", "a synthetic 300-slice CT study, the same for the same seed"),
        ("kaapcli mock -o mr --modality MR --studies 2 --series 3", "two MR studies of three series each"),
    ],
    "dcm2json": [
        ("kaapcli dcm2json ct -o meta", "one Kaapana meta JSON per series: meta/<SeriesInstanceUID>.json"),
        ("kaapcli dcm2json ct -o meta --per-instance --format jsonl", "one document per file, JSON records on stdout"),
        ("kaapcli mock -o ct2 -q | kaapcli dcm2json - -o meta2", "paths on stdin, as the previous command wrote them"),
    ],
    "modify": [
        ("kaapcli modify ct -o out -m PatientName=Anon^Patient -e InstitutionName --erase-private",
         "dcmodify's -m/-e into a new tree; the inputs stay as they are"),
        ("kaapcli modify ct --in-place --if Modality=CT -i BodyPartExamined=CHEST",
         "insert a tag in place, only in the CT files"),
        ("kaapcli modify seg ct -o out --new-uids study --new-uids series --uid-seed project42",
         "new study and series UIDs, references updated, reproducible from the seed"),
    ],
    "sort": [
        ("kaapcli sort ct -o sorted", "a tidy patient/study/series tree (copies); paths on stdout"),
        ("kaapcli sort ct -o by-modality --layout '{Modality}/{SeriesInstanceUID}/{InstanceNumber}.dcm' --link",
         "your own layout, hard links instead of copies"),
    ],
    "anonymize": [
        ("kaapcli anonymize ct -o anon --key SECRET", "PS3.15 Basic Profile; the same key gives the same pseudonyms"),
        ("kaapcli anonymize ct -o anon --key SECRET --retain-dates shift --map anon-map.jsonl",
         "shift dates by a keyed offset, record original -> pseudonym"),
        ("kaapcli anonymize ct --in-place --key-file key --profile kaapana", "Kaapana's profile, files overwritten"),
    ],
    "phi-scan": [
        ("kaapcli phi-scan anon --originals ct", "look for values of the originals in the de-identified tree (exit 1)"),
        ("kaapcli phi-scan anon --allow date --show-values", "dates are fine here; show what was found"),
    ],
    "pdf2dcm": [
        ("kaapcli pdf2dcm report.pdf -o pdfdcm --study-from ct -k AccessionNumber=A123",
         "an Encapsulated PDF in the study of ct/"),
        ("kaapcli pdf2dcm reports -o pdfdcm --title 'Radiomics report'", "every PDF of a folder, with a title"),
    ],
    "dcm2pdf": [
        ("kaapcli dcm2pdf pdfdcm -o pdfs", "the PDFs back, byte for byte"),
        ("kaapcli dcm2pdf pdfdcm -o pdfs --format jsonl", "with one JSON record per input"),
    ],
    "bin2dcm": [
        ("kaapcli bin2dcm model.zip -o bindcm --chunk-mb 100", "any file as Raw Data Storage, 100 MB per instance"),
        ("kaapcli bin2dcm model.zip -o bindcm-p1 --study-from ct -k PatientID=P1", "in the study of ct/, PatientID P1"),
    ],
    "dcm2bin": [
        ("kaapcli dcm2bin bindcm -o restored", "the carried files back under their original names"),
        ("kaapcli dcm2bin bindcm -o restored -n", "what would be restored, nothing written"),
    ],
    "json2sr": [
        ("kaapcli json2sr radiomics/ct-radiomics.json --seg seg --reference ct -o sr",
         "a TID 1500 measurement report of the radiomics features"),
        ("kaapcli json2sr radiomics/ct-radiomics.json --seg seg --reference ct -o sr --title 'Lung nodules'",
         "with a document title"),
    ],
    "concat-json": [
        ("kaapcli concat-json meta -o all.json", "every meta JSON as one array"),
        ("kaapcli concat-json meta -o all.jsonl", "as JSON Lines"),
    ],
    "zip": [
        ("kaapcli zip meta -o meta.zip", "one archive of a folder"),
        ("kaapcli zip ct -o ct.zip --include '*.dcm,*.json' --exclude 'tmp/*'", "only some files of it"),
    ],
    "unzip": [
        ("kaapcli unzip upload.zip -o upload", "extract (names that would escape OUT are refused)"),
        ("kaapcli unzip uploads -o upload --format jsonl", "every archive of a folder, JSON records on stdout"),
    ],
    "split": [
        ("kaapcli split ct -o split --train 0.8 --seed 1", "train.txt and test.txt of SeriesInstanceUIDs, by patient"),
        ("kaapcli split ct -o split --by study --to json", "split.json, grouped by study"),
    ],
    "clean": [
        ("kaapcli clean runs --older-than 60d --dry-run", "which run folders are older than 60 days"),
        ("kaapcli clean runs --older-than 12h", "remove them"),
    ],
    "convert": [
        ("kaapcli convert ct -o nifti", "one NIfTI per stack of each series, plus a JSON sidecar"),
        ("kaapcli convert ct -o nifti --layout ct", "named nifti/ct.nii.gz (a study of one series)"),
        ("kaapcli convert ct -o volumes --to nrrd --layout '{PatientID}/{SeriesDescription}' --resample",
         "NRRD files named from the header; irregular series resampled, not refused"),
    ],
    "itk2dcm": [
        ("kaapcli itk2dcm nnunet -o dicom", "NIfTI cases (nnU-Net v2 or plain folders) as DICOM series plus SEG"),
        ("kaapcli itk2dcm cases -o dicom --modality MR --seed 7", "as MR, reproducible UIDs"),
    ],
    "itk2seg": [
        ("kaapcli itk2seg masks -r ct -o seg", "one DICOM SEG of the masks segmenting ct/"),
        ("kaapcli itk2seg masks -r ct -o seg --skip-empty --algorithm nnunet --algorithm-type AUTOMATIC",
         "no empty segments, the algorithm recorded"),
    ],
    "seg2itk": [
        ("kaapcli seg2itk seg -r ct -o seg-masks", "one NIfTI mask per segment on the grid of ct/"),
        ("kaapcli seg2itk seg -o labelmaps --labelmap -t nrrd", "one NRRD label map per SEG, on its own frames"),
    ],
    "merge-masks": [
        ("kaapcli merge-masks masks -o merged", "one label map per case"),
        ("kaapcli merge-masks masks -o merged-all --group-by all", "every mask of masks/ into one label map"),
        ("kaapcli merge-masks masks -o fused --mode fuse --labels liver,spleen --into abdomen",
         "two labels merged into one"),
    ],
    "resample": [
        ("kaapcli resample masks -r nifti/ct.nii.gz -o resampled --kind labels", "masks onto the image grid (nearest)"),
        ("kaapcli resample nifti -r ct -o resampled --interpolator bspline", "volumes onto a DICOM series' grid"),
    ],
    "radiomics": [
        ("kaapcli radiomics nifti/ct.nii.gz masks -o radiomics", "features of every label of the masks in masks/"),
        ("kaapcli radiomics nifti/ct.nii.gz --masks masks --bin-width 10 -o radiomics", "first-order bins of 10"),
    ],
    "thumbnail": [
        ("kaapcli thumbnail ct -o thumbs", "one PNG per series"),
        ("kaapcli thumbnail seg -r ct -o thumbs --size 256", "SEG overlaid on its reference, 256 pixels"),
    ],
    "echo": [
        ("kaapcli echo ORTHANC@pacs:4242", "C-ECHO; prints {\"peer\", \"ok\", \"ms\", \"status\"}"),
        ("kaapcli echo http://pacs:8042/dicom-web --timeout 5", "a QIDO-RS probe of a DICOMweb peer"),
    ],
    "send": [
        ("kaapcli send ct --to ORTHANC@pacs:4242", "C-STORE every file, honest statuses"),
        ("kaapcli send ct --to http://pacs:8042/dicom-web -j 4 --resume sent.jsonl", "STOW-RS, 4 at once, resumable"),
    ],
    "receive": [
        ("kaapcli receive -o incoming -p 11112", "a C-STORE receiver (storescp) on port 11112"),
        ("kaapcli receive -o incoming -p 11112 --rules rules.json -j 4 --index index.db",
         "index complete series and run their rules, 4 at once"),
    ],
    "query": [
        ("kaapcli query ORTHANC@pacs:4242 -l series -k Modality=CT", "C-FIND: one JSON line per series"),
        ("kaapcli query ORTHANC@pacs:4242 -k 'PatientID=MOCK*' -k StudyDate=20200101-20201231 --return AccessionNumber",
         "wildcards and date ranges, an extra return key"),
    ],
    "retrieve": [
        ("kaapcli retrieve ORTHANC@pacs:4242 -k PatientID=P1 -o dl", "C-GET a patient's studies"),
        ("kaapcli query ORTHANC@pacs:4242 -l series -k Modality=SEG | kaapcli retrieve ORTHANC@pacs:4242 "
         "--from-query - -o segs", "what a query found"),
        ("kaapcli retrieve ORTHANC@pacs:4242 --reference-of segs -o images --method move -p 11113",
         "the series the SEGs reference, by C-MOVE"),
    ],
    "delete": [
        ("kaapcli delete http://pacs:8042 --series 1.2.3.4 --yes", "one series, through Orthanc's REST API"),
        ("kaapcli delete http://arc:8080 --server-type dcm4chee --study 1.2.3 -y", "a study of dcm4chee-arc"),
    ],
    "index": [
        ("kaapcli index ct", "DICOM files read directly; the index remembers where they are"),
        ("kaapcli index meta --index index.db", "dcm2json output, into another index file"),
    ],
    "unindex": [
        ("kaapcli unindex --query 'Modality:SR'", "remove the matching series documents"),
        ("kaapcli search 'Tags:excluded' --format uids | kaapcli unindex --series -", "UIDs on stdin"),
    ],
    "search": [
        ("kaapcli search 'Modality:CT AND StudyDate:[2020-01-01 TO 2020-12-31]' --limit 10", "documents as JSON Lines"),
        ("kaapcli search 'Dataset:train' --format csv -f PatientID,StudyDate,Modality", "a CSV of three columns"),
        ("kaapcli search 'Modality:CT AND -Tags:excluded' --format paths | kaapcli convert - -o volumes",
         "from a search to volumes"),
    ],
    "tag add": [
        ("kaapcli tag add lung --query 'SeriesDescription:*LUNG*'", "tag the matching series"),
        ("kaapcli search 'BodyPartExamined:CHEST' --format uids | kaapcli tag add chest --series -", "UIDs on stdin"),
    ],
    "tag remove": [
        ("kaapcli tag remove lung --query 'Tags:lung AND Modality:SR'", "untag some series"),
        ("kaapcli tag remove --from-field Modality --query '*'", "remove tags named after a field's values"),
    ],
    "dataset add": [
        ("kaapcli dataset add train --query 'Modality:CT AND -Tags:excluded'", "a named list of series"),
        ("kaapcli dataset add 'site-{}' --from-field InstitutionName --query '*'", "one dataset per institution"),
    ],
    "dataset remove": [
        ("kaapcli dataset remove train --query 'Tags:excluded'", "take some series out"),
        ("kaapcli dataset remove train", "remove the dataset"),
    ],
    "dataset show": [
        ("kaapcli dataset show train --format uids", "its SeriesInstanceUIDs"),
        ("kaapcli dataset show train --format csv -f PatientID,SeriesDescription", "a CSV"),
    ],
    "dataset list": [
        ("kaapcli dataset list", "every dataset with its count, as JSON Lines"),
        ("kaapcli dataset list --index https://opensearch:9200 --project lung", "of an OpenSearch project"),
    ],
    "stats": [
        ("kaapcli stats Modality", "series per modality, as a bar chart"),
        ("kaapcli stats StudyDate:month --query 'Dataset:train' --format csv", "per month of a dataset, as CSV"),
    ],
    "gallery": [
        ("kaapcli gallery -o gallery --thumbnails thumbs", "a static HTML page of the indexed series"),
        ("kaapcli gallery -o gallery --query 'Tags:lung' --limit 100 --title 'Lung cohort'", "of some series"),
    ],
    "dashboard": [
        ("kaapcli dashboard -o dash", "charts of modality, body part, manufacturer, dates, tags, datasets"),
        ("kaapcli dashboard -o dash --query 'Dataset:train' -f Modality,StudyDate:year --top 5", "your own charts"),
    ],
    "s3 put": [
        ("kaapcli s3 put nifti s3://results/run-42/ --endpoint http://minio:9000", "upload a folder"),
        ("kaapcli s3 put meta s3://results/meta.zip --zip --s3 minio", "as one zip, with a [s3.minio] profile"),
    ],
    "s3 get": [
        ("kaapcli s3 get s3://results/run-42/ -o run-42 --endpoint http://minio:9000", "download a prefix"),
        ("kaapcli s3 get s3://results/meta.zip -o . --s3 minio", "one object"),
    ],
    "s3 ls": [
        ("kaapcli s3 ls s3://results/ --endpoint http://minio:9000", "keys under a prefix"),
        ("kaapcli s3 ls s3://results/run-42/ --long --s3 minio", "with size, etag and date, as JSON Lines"),
    ],
    "s3 rm": [
        ("kaapcli s3 rm s3://results/meta.zip --s3 minio", "one object"),
        ("kaapcli s3 rm -R s3://results/run-42/ --s3 minio", "everything under a prefix"),
    ],
    "rules check": [
        ("kaapcli rules check rules.json", "validate a rules file, print the rules in run order"),
        ("kaapcli rules check trigger_rule.json --dags dags.json", "Kaapana trigger rules with their DAGs"),
    ],
    "trigger": [
        ("kaapcli trigger ct --rules rules.json -o runs", "run the matching rules of every series of ct/"),
        ("kaapcli trigger ct --rules trigger_rule.json --dags dags.json --journal runs.jsonl",
         "Kaapana trigger rules, your own journal"),
    ],
    "runs": [
        ("kaapcli runs", "the runs of the journal, one JSON line each"),
        ("kaapcli runs --failed --journal runs.jsonl", "those that failed, timed out or were cancelled"),
    ],
    "runs sync": [
        ("kaapcli runs sync --queue redis://queue:6379/0", "enqueue the runs planned while Redis was down"),
        ("kaapcli runs sync --queue redis://queue:6379/0 --journal runs.jsonl", "of another journal"),
    ],
    "runs cancel": [
        ("kaapcli runs cancel 3f2a9c01d7e4", "stop a run (a queued one never starts)"),
        ("kaapcli runs cancel 3f2a9c01d7e4 --journal runs.jsonl", "of another journal"),
    ],
    "runs retry": [
        ("kaapcli runs retry 3f2a9c01d7e4", "run a failed run again"),
        ("kaapcli runs retry 3f2a9c01d7e4 --journal runs.jsonl", "of another journal"),
    ],
    "watch": [
        ("kaapcli watch dropbox -o store --rules rules.json", "a folder watcher: complete series run their rules"),
        ("kaapcli watch --orthanc http://pacs:8042 -o store --index index.db", "Orthanc's change feed into the index"),
        ("kaapcli watch dropbox -o store --once", "what is there now, then exit"),
    ],
    "collect": [
        ("kaapcli collect worklist.csv --from ORTHANC@pacs:4242 -o collected", "the studies of each worklist row"),
        ("kaapcli collect worklist.csv --from ORTHANC@pacs:4242 -o collected --anonymize --key-file key "
         "--to RESEARCH@10.0.0.5:104", "anonymized and forwarded"),
    ],
    "worker": [
        ("kaapcli worker --queue redis://queue:6379/0 -j 4", "run the rule jobs of a queue, 4 at once"),
        ("kaapcli worker --queue redis://queue:6379/0 --listen gpu --burst", "only the gpu queue, until it is empty"),
        ("kaapcli worker --queue redis://queue:6379/0 --s3 minio", "staged runs' series through an [s3.minio] profile"),
    ],
    "config show": [
        ("kaapcli config show", "the effective configuration, secrets masked"),
        ("kaapcli --config node.toml config show", "of another config file"),
    ],
}


def panel_of(name: str) -> str:
    """The root-help panel of a top-level command ("" when it has none: a test fails on that)."""
    return next((title for title, names in PANELS.items() if name in names), "")
