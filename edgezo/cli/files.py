"""Commands that move files: fetch into the cache, show or clear it, export an adapter, convert between formats,
plot a run."""

from __future__ import annotations

from pathlib import Path


from .. import store
from ..adapter import LoraAdapter, read_base_model_info
from ..files import EdgezoError
from ..resolve import resolve_adapter, resolve_base
from .output import say, TensorProgress


# ---- fetch -------------------------------------------------------------------------------------------------------
def cmd_fetch(args) -> tuple[dict, str]:
    paths = {name: str(store.fetch(name, log=say)) for name in args.names}
    return {"paths": paths}, "\n".join(f"{name}: {path}" for name, path in paths.items())


# ---- cache -------------------------------------------------------------------------------------------------------
def cmd_cache(args) -> tuple[dict, str]:
    """$EDGEZO_HOME area by area; with --clear, those areas removed first."""
    from .. import cache

    freed = cache.clear(cache.resolve_areas(args.clear)) if args.clear else 0
    areas = cache.usage()
    rows = [{"area": u.area.name, "path": str(u.path), "files": u.n_files, "bytes": u.n_bytes, "holds": u.area.holds,
             "derived": u.area.derived, "comes_back": u.area.comes_back} for u in areas]
    lines = [f"{u.area.name:14}{u.n_bytes / 2**20:10.1f} MiB {u.n_files:6d} files  {u.area.holds}; if removed, "
             f"{u.area.comes_back}" for u in areas]
    lines.append(f"{'total':14}{sum(u.n_bytes for u in areas) / 2**20:10.1f} MiB in {store.home()}")
    if args.clear:
        lines.insert(0, f"cleared {args.clear}: {freed / 2**20:.1f} MiB freed")
    return {"home": str(store.home()), "areas": rows, "freed_bytes": freed}, "\n".join(lines)


# ---- export ------------------------------------------------------------------------------------------------------
def cmd_export(args) -> tuple[dict, str]:
    adapter_path, saved = resolve_adapter(args.adapter)
    if adapter_path is None:
        raise EdgezoError("export needs --adapter")
    # the base the adapter was trained on (merged-gguf folds it into exactly those weights), unless --model/--quant
    model_path = resolve_base(args, saved, log=say)
    base = read_base_model_info(model_path)
    adapter = LoraAdapter.load(adapter_path, base)  # validates every tensor against the base
    out = Path(args.output)
    if args.to == "gguf-lora":
        adapter.save(out)
    elif args.to == "peft":
        from edgezo.convert.peft import adapter_to_peft

        adapter_to_peft(adapter, out, base)
    else:  # merged-gguf
        from edgezo.convert.merge import merge_adapter

        with TensorProgress("merge") as progress:
            merge_adapter(model_path, adapter, out, outtype=args.outtype, progress=progress)
    result = {"output": str(out), "format": args.to, "n_params": adapter.n_params, "rank": adapter.config.rank,
              "alpha": adapter.config.alpha, "targets": list(adapter.config.targets)}
    if args.to == "merged-gguf":
        result["outtype"] = args.outtype
    return result, f"wrote {out} ({args.to}, {adapter.n_params:,} adapter parameters)"


# ---- convert -----------------------------------------------------------------------------------------------------
def cmd_convert(args) -> tuple[dict, str]:
    out = Path(args.output)
    if args.direction == "hf-to-gguf":
        from edgezo.convert.hf_to_gguf import convert_hf_to_gguf

        with TensorProgress("hf-to-gguf") as progress:
            convert_hf_to_gguf(args.input, out, outtype=args.outtype, progress=progress)
    elif args.direction == "gguf-to-hf":
        from edgezo.convert.gguf_to_hf import convert_gguf_to_hf

        with TensorProgress("gguf-to-hf") as progress:
            convert_gguf_to_hf(args.input, out, progress=progress)
    else:
        if not args.base:
            raise EdgezoError(f"convert {args.direction} needs --base BASE.gguf (the model the adapter belongs to)")
        base = store.resolve_model(args.base, None, log=say)
        from edgezo.convert.peft import gguf_to_peft, peft_to_gguf

        (peft_to_gguf if args.direction == "peft-to-gguf" else gguf_to_peft)(args.input, base, out)
    return {"input": args.input, "output": str(out), "direction": args.direction}, f"wrote {out}"


# ---- plot --------------------------------------------------------------------------------------------------------
def cmd_plot(args) -> tuple[dict, str]:
    """Training loss, validation loss and accuracy of the runs against steps and training wall-clock (edgezo.plot)."""
    from ..plot import save_plot

    _, curves = save_plot(args.runs, args.output, args.title)
    runs = {c.label: {"n_steps": len(c.steps), "n_evals": len(c.evals)} for c in curves}
    return {"output": str(args.output), "runs": runs}, f"wrote {args.output} ({len(curves)} run(s))"
