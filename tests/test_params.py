import pytest
from conftest import ROOT

from finetune.config.hardware import Hardware
from finetune.config.params import Params, load_params, parse_params
from finetune.config.schema import ParamsError


def problems_of(text: str) -> list[str]:
    with pytest.raises(ParamsError) as err:
        parse_params(text, source="params.yaml")
    return err.value.problems


def test_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.lora.r == 8 and params.lora.lora_alpha == 32
    assert params.lora.target_modules == ["q_proj", "v_proj"]
    assert params.lora.bias == "none"


def test_the_schema_defaults_are_params_yaml():
    """One source of defaults: deleting a key from params.yaml must not change the run, and params.yaml holds every
    knob the schema has (the schema's unknown-key check covers the other way)."""
    import dataclasses

    import yaml

    written = yaml.safe_load((ROOT / "params.yaml").read_text())

    def differences(defaults, values: dict, prefix: str) -> list[str]:
        out = []
        for field in dataclasses.fields(defaults):
            default, name = getattr(defaults, field.name), prefix + field.name
            if name.count(".") == 0 and not dataclasses.is_dataclass(default):
                continue
            if field.name not in values:
                out.append(f"{name}: not in params.yaml")
            elif dataclasses.is_dataclass(default):
                out += differences(default, values[field.name], name + ".")
            elif default != values[field.name]:
                out.append(f"{name}: {default!r} in the schema, {values[field.name]!r} in params.yaml")
        return out

    assert differences(Params.defaults(), written, "") == []
    assert Params.defaults() == load_params(ROOT / "params.yaml")


def test_missing_sections_take_defaults():
    params = parse_params("train:\n  learning_rate: 1.0e-4\n")
    assert params.train.learning_rate == 1e-4
    assert params.lora == Params.defaults().lora


def test_unknown_key_names_path_line_and_closest_key():
    problems = problems_of("train:\n  seed: 1\n  learnig_rate: 0.001\n")
    assert problems == ["params.yaml:3: train.learnig_rate: unknown key; did you mean train.learning_rate?"]


def test_unknown_section_is_an_error():
    assert "did you mean evaluate?" in problems_of("evalute:\n  batch_size: 4\n")[0]


def test_all_problems_are_reported_together():
    problems = problems_of(
        "train:\n  learning_rate: -1\n  fp16: true\n  bf16: true\n"
        "lora:\n  r: 0\n  lora_dropout: 1.5\n"
        "data:\n  test_ratio: 1.2\n")
    text = "\n".join(problems)
    assert "train.learning_rate: -1.0 must be positive" in text
    assert "train.fp16 and train.bf16: both are true" in text
    assert "lora.r: 0 must be at least 1" in text
    assert "lora.lora_dropout: 1.5 is outside [0, 1)" in text
    assert "data.test_ratio: 1.2 is outside [0, 1)" in text
    assert problems[0].startswith("params.yaml:2: ")  # each problem carries its line


@pytest.mark.parametrize("text, expected", [
    ("train:\n  per_device_train_batch_size: four\n", "'four' is not an integer"),
    ("train:\n  fp16: 1\n", "1 is not true/false"),
    ("lora:\n  target_modules: q_proj\n", "is not a list of strings"),
    ("lora:\n  bias: some\n", "'some' is not 'none' or 'all' or 'lora_only'"),
    ("prepare:\n  overlong: cut\n", "'cut' is not 'truncate' or 'drop'"),
])
def test_wrong_types_name_key_value_and_allowed(text, expected):
    assert expected in problems_of(text)[0]


def test_invalid_yaml_is_reported():
    assert "not valid YAML" in problems_of("train: [unclosed\n")[0]


def test_integers_are_accepted_for_floats():
    assert parse_params("train:\n  num_train_epochs: 2\n").train.num_train_epochs == 2.0


CPU = Hardware(cuda=False, cuda_bf16=False, bitsandbytes=True)
OLD_GPU = Hardware(cuda=True, cuda_bf16=False, bitsandbytes=True)


@pytest.mark.parametrize("text, hardware, expected", [
    ("train:\n  fp16: true\n", CPU, "train.fp16: true, but there is no CUDA device"),
    ("train:\n  bf16: true\n", OLD_GPU, "train.bf16: true, but this GPU has no bf16 support"),
    ("train:\n  method: qlora\nquantization:\n  bnb_4bit_compute_dtype: float16\n", CPU,
     "quantization.bnb_4bit_compute_dtype: float16 needs a CUDA device"),
    ("train:\n  method: qlora\n", OLD_GPU, "quantization.bnb_4bit_compute_dtype: bfloat16 is not supported"),
    ("train:\n  method: qlora\n", Hardware(cuda=False, cuda_bf16=False, bitsandbytes=False),
     "qlora needs bitsandbytes"),
    ("distributed:\n  strategy: fsdp\n  fsdp: {cpu_offload: true}\n", CPU,
     "distributed.fsdp.cpu_offload: true needs CUDA GPUs"),
])
def test_requests_the_hardware_cannot_do_are_refused(text, hardware, expected):
    with pytest.raises(ParamsError) as err:
        parse_params(text, source="params.yaml", hardware=hardware, training=True)
    assert expected in "\n".join(err.value.problems)
    parse_params(text, source="params.yaml", hardware=hardware)  # a stage that does not train is not refused


def test_cpu_can_do_bf16_and_qlora_in_float32():
    parse_params("train:\n  bf16: true\n", hardware=CPU, training=True)
    parse_params("train:\n  method: qlora\nquantization:\n  bnb_4bit_compute_dtype: float32\n", hardware=CPU,
                 training=True)


def test_a_knob_with_one_legal_value_is_gone():
    assert "quantization.load_in_4bit: unknown key" in problems_of("quantization:\n  load_in_4bit: true\n")[0]


def test_lora_variants_and_all_linear_are_accepted():
    params = parse_params("lora:\n  target_modules: all-linear\n  use_dora: true\n  use_rslora: true\n"
                          "  modules_to_save: [lm_head]\n")
    assert params.lora.target_modules == "all-linear" and params.lora.modules_to_save == ["lm_head"]


@pytest.mark.parametrize("written", ["1e-4", "1e-04", "1.0e-4", "0.0001"])
def test_exponent_floats_without_a_dot_are_numbers(written):
    # `dvc exp run -S train.learning_rate=1e-4` writes `1e-04`: a float in YAML 1.2 (and to DVC), a string to PyYAML
    assert parse_params(f"train:\n  learning_rate: {written}\n").train.learning_rate == 1e-4
