"""Commands that answer questions before or around a run: memory, capacity, doctor, and the demo."""

from __future__ import annotations



from .. import store
from ..formats import check_base_file
from ..memory import TORCH_METHODS, torch_method
from ..rundir import RunDir
from ..resolve import DEFAULT_DATA, dataset_max_seq_len, lora_from_args, predict_run, resolve_base
from .finetune import cmd_finetune
from .generate import cmd_eval
from .output import say
from .parser import build_parser


def cmd_memory(args) -> tuple[dict, str]:
    """Predicted peak RSS of exactly the run these arguments describe (the finetune / reference-bp / eval flags).

    Without --data the worst case: every sequence --max-seq-len tokens long. With --data the run's own batches: the
    training batches of --steps steps from --seed, the validation batches of --n-valid examples (for --method
    inference: the first --limit examples of --split), tokenized as the run would."""
    from ..memory import load_device_profile

    method = args.method
    if method.startswith("bp"):
        quantized = method.startswith("bp-quant") or args.base_dtype != "float"
        method = torch_method(args.gradient_checkpointing or method.endswith("-ckpt"), quantized)
    model_path = resolve_base(args, log=say)
    dataset_max_seq_len(args, args.data, log=say)  # as the run it describes does
    if method.startswith("bp-quant"):
        check_base_file(model_path, None if args.base_dtype == "float" else args.base_dtype)
    profile = load_device_profile(args.device) if args.device else None
    # for a device, its llama.cpp build (which weights it repacks); else the one installed here
    prediction, seq_len = predict_run(model_path, method, args, log=say,
                                      system_info=profile.llama_cpp_system_info if profile else None)
    result = {"predicted_bytes": prediction.total_bytes, "breakdown": prediction.breakdown, "method": method,
              "model": str(model_path), "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
              "seq_len": seq_len, "data": args.data}
    if method in TORCH_METHODS:
        result["dtype"] = args.dtype
    lines = [f"{k:28}{v / 2**20:10.1f} MiB" for k, v in prediction.breakdown.items()]
    what = f"{method}, batch {args.batch_size} x {seq_len} tokens" + ("" if args.data else " (worst case)")
    lines.append(f"{'predicted peak RSS':28}{prediction.total_bytes / 2**20:10.1f} MiB ({what})")
    if profile:
        fits = prediction.total_bytes <= profile.usable_ram_bytes
        result.update(device=profile.key, usable_ram_bytes=profile.usable_ram_bytes, fits=fits)
        lines.append(f"{profile.name}: {profile.usable_ram_bytes / 2**20:.0f} MiB usable -> {'fits' if fits else 'does NOT fit'}")
    return result, "\n".join(lines)


# ---- capacity ----------------------------------------------------------------------------------------------------
def cmd_capacity(args) -> tuple[dict, str]:
    """The largest model of the known families each method fits on a device (edgezo.capacity)."""
    from ..capacity import capacity, format_capacity, load_specs
    from ..memory import load_device_profile

    profile = load_device_profile(args.device)
    families = [f for f in args.family.split(",") if f] if args.family else None
    lora = lora_from_args(args)
    result = capacity(profile.usable_ram_bytes, load_specs(families), args.batch_size, args.seq_len, lora,
                      profile.llama_cpp_system_info)
    result.update(device=profile.key, device_name=profile.name, usable_ram_bytes=profile.usable_ram_bytes)
    header = (f"{profile.name}: {profile.usable_ram_bytes / 2**20:.0f} MiB usable; batch {args.batch_size} x "
              f"{args.seq_len} tokens, LoRA rank {lora.rank} on {','.join(lora.targets)}")
    return result, header + "\n" + format_capacity(result)


# ---- doctor ------------------------------------------------------------------------------------------------------
def cmd_doctor(args) -> tuple[dict, str]:
    """Versions, the llama.cpp build, the CPU, the kernels the engine will use, and a decode probe in a child process."""
    from ..doctor import environment, probe_in_child

    result = environment(store.home(), args.threads)
    if args.probe:
        model_path = resolve_base(args, log=say)
        say(f"probing a decode of {model_path.name} in a child process ...")
        result["probe"] = {"model": str(model_path), **probe_in_child(model_path, args.threads)}
    return result, format_doctor(result)


def format_doctor(r: dict) -> str:
    k, cpu = r["kernels"], r["cpu"]
    lines = [
        f"edgezo {r['edgezo']}, Python {r['python']}, {r['platform']}",
        "versions: " + ", ".join(f"{name} {v or '-'}" for name, v in r["versions"].items()),
        f"cpu: {cpu['model']} ({cpu['machine']}), {cpu['usable_cores']} of {cpu['n_cores']} cores usable; "
        f"flags: {' '.join(cpu['flags']) if cpu['flags'] is not None else 'unknown'}",
        f"llama.cpp build: {r['llama_cpp_system_info'].strip()}",
        f"AMX: kernels built {'yes' if k['amx_kernels_built'] else 'no'}, CPU has AMX "
        f"{ {True: 'yes', False: 'no', None: 'unknown'}[k['cpu_has_amx']] }, avoided {'yes' if k['avoid_amx'] else 'no'} "
        f"({k['decision']}; EDGEZO_AMX={k['amx_mode']})",
        f"repacked kernels built: {'yes' if k['repack_built'] else 'no'}; "
        f"flash attention: {'on' if k['flash_attention'] else 'off'}; "
        f"threads: {format_threads(r['threads'])}",
        "repacked layout per --quant: " + (", ".join(f"{q} {layout}" for q, layout in k["repack"].items() if layout)
                                           or "none (every weight in its GGUF layout)"),
        *([format_arm(k["arm"])] if k.get("arm") else []),
        f"cache: {r['cache']['path']} ({r['cache']['free_bytes'] / 2**30:.1f} GiB free)" if r["cache"]["free_bytes"] is not None
        else f"cache: {r['cache']['path']}",
    ]
    probe = r.get("probe")
    if probe and probe["ok"]:
        buffers = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in probe["weight_buffers_mib"].items())
        lines.append(f"decode probe: ok, {probe['n_sequences']} sequences in {probe['seconds']} s, logits "
                     f"{'finite' if probe['finite'] else 'NOT FINITE'}; weights: {buffers}")
    elif probe:
        lines.append(f"decode probe: FAILED (exit {probe['returncode']}): {' / '.join(probe['stderr_tail'])}")
    return "\n".join(lines)


def format_arm(arm: dict) -> str:
    build = " ".join(f"{name}={value}" if name == "SVE_CNT" else name for name, value in arm["build"].items())
    if arm["cpu"] is None:
        return f"ARM build features: {build or 'none'} (this is not an ARM CPU)"
    has = ", ".join(f"{label} {'yes' if flag in arm['cpu'] else 'no'}"
                    for label, flag in (("NEON", "asimd"), ("dotprod", "asimddp"), ("i8mm", "i8mm"), ("SVE", "sve")))
    missing = ", ".join(arm["missing_on_cpu"])
    return (f"ARM: CPU has {has}; build uses {build or 'none'}"
            + (f"; MISSING on this CPU: {missing} (expect SIGILL: rebuild, `make install-llama-cpp`)" if missing else ""))


def format_threads(t: dict) -> str:
    openmp = ", ".join(f"{k}={v}" for k, v in t["openmp"].items() if v) or "libgomp's defaults"
    if t["chosen_by"] != "load":
        return f"{t['n_threads']} (--threads); OpenMP: {openmp}"
    load = ("load unreadable here, all usable cores" if t["others_busy_cores"] is None
            else f"other processes keep {t['others_busy_cores']:.2f} cores busy")
    return (f"{t['n_threads']} now ({load}; load average {t['load_average'][0]:.2f}; measured again before every "
            f"decode); OpenMP: {openmp}")


# ---- demo --------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> tuple[dict, str]:
    """The main job on the defaults: zero-shot test accuracy, a MeZO fine-tune, then the tuned test accuracy.

    Runs exactly the documented commands; an earlier demo run in --out is resumed (a finished one is reused).
    """
    parser = build_parser()
    resolve_base(args, log=say)  # fetch / requantize once, and name what the three steps run on
    common = ["--model", args.model, "--quant", args.quant or "none", "--threads", str(args.threads)]
    say("== 1/3 zero-shot accuracy on the test split")
    zero, text = cmd_eval(parser.parse_args(["eval", *common, "--data", DEFAULT_DATA, "--split", "test"]))
    say(text)
    say(f"== 2/3 MeZO fine-tune, {args.steps} steps (defaults otherwise)")
    finetune = ["finetune", *common, "--data", DEFAULT_DATA, "--steps", str(args.steps), "--out", args.out]
    run, text = cmd_finetune(parser.parse_args(finetune + (["--resume"] if RunDir(args.out).state.exists() else [])))
    say(text)
    say("== 3/3 fine-tuned accuracy on the test split")
    tuned, text = cmd_eval(parser.parse_args(["eval", *common, "--adapter", args.out, "--split", "test"]))
    say(text)
    result = {"zero_shot_accuracy": zero["accuracy"], "finetuned_accuracy": tuned["accuracy"],
              "gain_points": 100 * (tuned["accuracy"] - zero["accuracy"]), "zero_shot_loss": zero["loss"],
              "finetuned_loss": tuned["loss"], "n_test": tuned["n_examples"], "steps": run["steps"],
              "adapter": run["adapter"], "finetune_seconds": run["seconds"], "model": args.model, "quant": args.quant}
    table = (f"{'':24}{'accuracy':>10}{'loss':>9}\n"
             f"{'zero-shot':24}{zero['accuracy']:>10.4f}{zero['loss']:>9.4f}\n"
             f"{'MeZO, ' + str(run['steps']) + ' steps':24}{tuned['accuracy']:>10.4f}{tuned['loss']:>9.4f}\n"
             f"gain {result['gain_points']:+.1f} points on {tuned['n_examples']} test reviews; "
             f"fine-tune took {run['seconds']:.0f} s; adapter {run['adapter']}")
    return result, table
