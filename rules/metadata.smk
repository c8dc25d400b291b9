rule metadata_aggregate:
    input:
        manifest=out("manifest.csv"),
        stage_outputs=get_metadata_inputs,
    output:
        metadata=out("metadata.csv"),
        statistics=out("statistics.txt"),
    log:
        out("logs/metadata_aggregate.log"),
    localrule: True
    conda:
        "../envs/base.yaml"
    script:
        "../scripts/metadata_aggregate.py"


rule metadata:
    input:
        out("metadata.csv"),
