# Download: TRELLIS-500K assets fetched to raw/<subset>/<sha256>/ (source.type trellis500k).
# Settings and helpers are in rules/common.smk; the logic in
# slatflow/download.py. Other sources' files exist already: these rules never run for them.


register_stage_target("downloads", source_files)


rule download_subset_csv:
    output:
        out("raw/trellis500k/{subset}.csv"),
    log:
        out("logs/download_subset_csv/{subset}.log"),
    wildcard_constraints:
        subset="|".join(SUBSETS),
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        url=lambda wildcards: DOWNLOAD.csv_url(wildcards.subset),
    script:
        "../scripts/download_file.py"


rule download_object_paths:
    output:
        out(f"raw/{SKETCHFAB}/{OBJECT_PATHS_FILE}"),
    log:
        out("logs/download_object_paths.log"),
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        url=DOWNLOAD.object_paths_url(),
    script:
        "../scripts/download_file.py"


rule download_asset:
    output:
        out("raw/{subset}/{sha256}/{filename}"),
    log:
        out("logs/download_asset/{subset}/{sha256}/{filename}.log"),
    benchmark:
        out("benchmarks/download_asset/{subset}/{sha256}/{filename}.tsv")
    wildcard_constraints:
        subset="|".join(SUBSETS),
        filename="[^.].*",
    conda:
        "../envs/base.yaml"
    threads: 1  # waits on the network; the hash runs at disk speed
    resources:
        # per-host caps: profiles/default sets how many run at once
        hf_downloads=download_slot(*HF_SUBSETS),
        github_downloads=download_slot(GITHUB),
        # the first ABO job streams the archive for every ABO asset of the run
        runtime=lambda wildcards: 720 if wildcards.subset == "ABO" else 30,
    params:
        source=get_download_source,
    script:
        "../scripts/download_asset.py"


rule downloads:
    input:
        get_stage_targets("downloads"),
        out("metadata.csv"),
