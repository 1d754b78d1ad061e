"""An interactive front end over precompute_embeddings.py, train_flux_lora.py and sample.py.

    marimo run notebook.py                  # the app in a browser
    marimo edit notebook.py                 # the notebook, to change it
    python notebook.py                      # every cell once, as a script (no run is started)
    marimo run notebook.py -- --run_dir runs/mine --dataset my/images --model path/or/hub-id

Pick a dataset and see its captions and buckets, set the main settings, start precompute and
training as subprocesses, watch the loss, throughput, ETA and previews, compare preview rounds,
render any checkpoint with sample.py, and stop a run. The logic lives in fluxlora/runs.py.
"""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="FLUX.1 LoRA trainer")


@app.cell
def _():
    import marimo as mo
    import torch

    from fluxlora import runs

    return mo, runs, torch


@app.cell
def _(mo, runs, torch):
    # Defaults: the tiny model and demo dataset unless the command line names others
    # (`marimo run notebook.py -- --run_dir DIR --dataset D --model M`).
    _args = mo.cli_args()
    _run_dir = str(_args.get("run_dir") or "runs/notebook")
    _gpu = torch.cuda.is_available()
    defaults = runs.RunSettings(
        dataset=str(_args.get("dataset") or "demo/images"),
        model=str(_args.get("model") or f"{_run_dir}/tiny-flux-dev"),
        run_dir=_run_dir,
        # accelerate launch only pays off with GPUs; on the CPU plain python starts faster.
        launcher="accelerate" if _gpu else "python",
        mixed_precision="bf16" if _gpu else "no",
    )
    _prompts_file = runs.REPO_ROOT / "demo" / "validation_prompts.txt"
    default_prompts = _prompts_file.read_text() if _prompts_file.is_file() else ""
    mo.md(
        "# FLUX.1 LoRA trainer\n"
        "A front end over `precompute_embeddings.py`, `train_flux_lora.py` and `sample.py`: "
        "every run is one of those scripts in its own process, with the command shown below."
    )
    return default_prompts, defaults


@app.cell
def _(defaults, mo):
    dataset_input = mo.ui.text(value=defaults.dataset, label="Dataset (folder or table)", full_width=True)
    resolutions_input = mo.ui.text(value=" ".join(map(str, defaults.resolutions)), label="Resolutions (px)")
    trigger_input = mo.ui.text(value=defaults.trigger_phrase, label="Trigger phrase")
    mo.vstack([mo.md("## 1. Dataset"), dataset_input, mo.hstack([resolutions_input, trigger_input], justify="start")])
    return dataset_input, resolutions_input, trigger_input


@app.cell
def _(mo, resolutions_input, runs):
    try:
        resolutions = runs.parse_resolutions(resolutions_input.value)
        resolution_error = None
    except ValueError as _error:
        resolutions, resolution_error = (), str(_error)
    return resolution_error, resolutions


@app.cell
def _(dataset_input, defaults, mo, resolution_error, resolutions, runs, trigger_input):
    dataset_error = resolution_error
    dataset_rows = []
    if dataset_error is None:
        try:
            dataset_rows = runs.scan_dataset(dataset_input.value, resolutions, trigger_phrase=trigger_input.value,
                                             max_upscale=defaults.max_upscale)
        except (FileNotFoundError, ValueError) as _error:
            dataset_error = str(_error)

    def _bucket(bucket):
        return f"{bucket[0]}x{bucket[1]}" if bucket else "skipped (upscale)"

    dataset_table = mo.ui.table(
        [
            {
                "image": mo.image(row.thumbnail) if row.thumbnail else "",
                "source": row.source,
                "caption": row.caption if row.caption is not None else f"skipped: {row.problem}",
                "size": f"{row.size[0]}x{row.size[1]}" if row.size else "",
                **{f"bucket @ {res}": _bucket(row.buckets.get(res)) if row.size else "" for res in resolutions},
            }
            for row in dataset_rows
        ],
        selection=None,
        page_size=20,
        label=f"{len(dataset_rows)} samples (at most 200 shown)",
    )
    _summary = "; ".join(
        f"**{res} px**: " + ", ".join(f"{w}x{h} × {n}" for (w, h), n in sorted(counts.items()))
        for res, counts in runs.bucket_counts(dataset_rows).items()
    )
    mo.callout(dataset_error, kind="danger") if dataset_error else mo.vstack(
        [mo.md(f"Buckets: {_summary}"), dataset_table]
    )
    return dataset_error, dataset_rows, dataset_table


@app.cell
def _(defaults, mo):
    model_input = mo.ui.text(value=defaults.model, label="Model (diffusers folder, .safetensors or hub id)",
                             full_width=True)
    build_button = mo.ui.run_button(label="Build a tiny random FLUX.1 here")
    mo.vstack([mo.md("## 2. Model"), mo.hstack([model_input, build_button], justify="start", align="end")])
    return build_button, model_input


@app.cell
def _(build_button, mo, model_input, runs):
    if build_button.value:
        # Imported on demand: diffusers takes seconds to import and only this button needs it here.
        from fluxlora.tiny import build_tiny_flux

        with mo.status.spinner(title="Building the tiny model..."):
            build_tiny_flux(runs.resolve(model_input.value))
    model_ok, model_message = runs.describe_model(model_input.value)
    mo.callout(mo.md(f"Model: {model_message}"), kind="success" if model_ok else "warn")
    return model_message, model_ok


@app.cell
def _(default_prompts, defaults, mo, runs):
    run_dir_input = mo.ui.text(value=defaults.run_dir, label="Run folder", full_width=True)
    rank_input = mo.ui.number(start=1, stop=1024, step=1, value=defaults.rank, label="LoRA rank")
    steps_input = mo.ui.number(start=1, step=1, value=defaults.steps, label="Steps")
    lr_input = mo.ui.text(value=f"{defaults.learning_rate:g}", label="Learning rate")
    validation_steps_input = mo.ui.number(start=0, step=1, value=defaults.validation_steps,
                                          label="Preview every (steps, 0: never)")
    checkpoint_steps_input = mo.ui.number(start=1, step=1, value=defaults.checkpointing_steps,
                                          label="Checkpoint every (steps)")
    preview_steps_input = mo.ui.number(start=1, step=1, value=defaults.preview_inference_steps,
                                       label="Preview denoising steps")
    prompts_input = mo.ui.text_area(value=default_prompts, label="Validation prompts (one a line)",
                                    full_width=True, rows=3)
    precision_input = mo.ui.dropdown(list(runs.MIXED_PRECISIONS), value=defaults.mixed_precision,
                                     label="Mixed precision")
    launcher_input = mo.ui.dropdown(list(runs.LAUNCHERS), value=defaults.launcher, label="Launcher")
    processes_input = mo.ui.number(start=1, step=1, value=defaults.num_processes, label="Processes")
    resume_input = mo.ui.checkbox(value=False, label="Resume from the latest checkpoint")
    mo.vstack([
        mo.md("## 3. Training settings"),
        run_dir_input,
        mo.hstack([rank_input, steps_input, lr_input], justify="start"),
        mo.hstack([validation_steps_input, checkpoint_steps_input, preview_steps_input], justify="start"),
        prompts_input,
        mo.hstack([precision_input, launcher_input, processes_input, resume_input], justify="start", align="end"),
    ])
    return (checkpoint_steps_input, launcher_input, lr_input, precision_input, preview_steps_input,
            processes_input, prompts_input, rank_input, resume_input, run_dir_input, steps_input,
            validation_steps_input)


@app.cell
def _(checkpoint_steps_input, dataset_input, defaults, launcher_input, lr_input, mo, model_input,
      precision_input, preview_steps_input, processes_input, prompts_input, rank_input, resolution_error,
      resolutions, resume_input, run_dir_input, runs, steps_input, trigger_input, validation_steps_input):
    try:
        if resolution_error:
            raise ValueError(resolution_error)
        settings = runs.RunSettings(
            dataset=dataset_input.value,
            model=model_input.value,
            run_dir=run_dir_input.value,
            resolutions=resolutions,
            rank=int(rank_input.value),
            steps=int(steps_input.value),
            learning_rate=runs.parse_positive_float(lr_input.value, "learning rate"),
            trigger_phrase=trigger_input.value,
            validation_prompts=runs.parse_prompts(prompts_input.value),
            validation_steps=int(validation_steps_input.value),
            checkpointing_steps=int(checkpoint_steps_input.value),
            preview_inference_steps=int(preview_steps_input.value),
            max_upscale=defaults.max_upscale,
            mixed_precision=precision_input.value,
            resume=resume_input.value,
            launcher=launcher_input.value,
            num_processes=int(processes_input.value),
        )
        settings_error = None
        precompute_cmd = runs.precompute_command(settings)
        train_cmd = runs.train_command(settings)
    except (TypeError, ValueError) as _error:  # TypeError: a number field left empty (None)
        settings, settings_error, precompute_cmd, train_cmd = None, str(_error), [], []
    mo.callout(settings_error, kind="danger") if settings_error else mo.accordion(
        {"Commands": mo.md(f"```bash\n{runs.shell_line(precompute_cmd)}\n\n{runs.shell_line(train_cmd)}\n```")}
    )
    return precompute_cmd, settings, settings_error, train_cmd


@app.cell
def _(mo):
    # The run being watched: (settings it started with, Job), and the sample.py job: (folders, Job).
    get_run, set_run = mo.state(None)
    get_render, set_render = mo.state(None)
    get_notice, set_notice = mo.state("")
    # Preview steps and LoRA files found so far; set by the live monitor only when they change, so
    # the pickers below are rebuilt (and lose their selection) only when there is something new.
    get_preview_steps, set_preview_steps = mo.state(())
    get_loras, set_loras = mo.state(())
    return (get_loras, get_notice, get_preview_steps, get_render, get_run, set_loras, set_notice,
            set_preview_steps, set_render, set_run)


@app.cell
def _(get_run, mo, precompute_cmd, runs, set_notice, set_run, settings, train_cmd):
    def _start(_):
        _current = get_run()
        if _current is not None and _current[1].state == "running":
            set_notice("A run is already going; stop it first.")
            return
        if settings is None:
            set_notice("Fix the settings first.")
            return
        _model_ok, _model_message = runs.describe_model(settings.model)
        _problem = runs.fresh_run_problem(settings) if _model_ok else _model_message
        if _problem:
            set_notice(_problem)
            return
        _log = runs.resolve(settings.run_dir) / "notebook-train.log"
        _job = runs.Job([runs.Step("precompute", tuple(precompute_cmd)), runs.Step("train", tuple(train_cmd))],
                        _log).start()
        set_notice("")
        set_run((settings, _job))

    def _stop(_):
        _current = get_run()
        if _current is not None:
            _current[1].stop()

    start_button = mo.ui.button(label="Start precompute + training", kind="success", on_click=_start)
    stop_button = mo.ui.button(label="Stop", kind="danger", on_click=_stop)
    mo.vstack([mo.md("## 4. Run"), mo.hstack([start_button, stop_button], justify="start")])
    return start_button, stop_button


@app.cell
def _(get_run, runs, settings):
    # What the monitor watches: the run started here, else the run folder of the form (an earlier run).
    watched = get_run()
    watched_settings = watched[0] if watched else settings
    watched_job = watched[1] if watched else None
    log_tail = runs.LogTail(runs.resolve(watched_settings.output_dir) / "logs.jsonl") if watched_settings else None
    return log_tail, watched_job, watched_settings


@app.cell
def _(mo):
    refresh = mo.ui.refresh(options=["1s", "2s", "5s", "10s"], default_interval="2s", label="Update every")
    refresh
    return (refresh,)


@app.cell
def _(get_loras, get_notice, get_preview_steps, log_tail, mo, refresh, runs, set_loras, set_preview_steps,
      watched_job, watched_settings):
    refresh.value  # re-run on every tick
    if watched_settings is None:
        monitor = mo.md("Nothing to watch until the settings are valid.")
    else:
        _out = runs.resolve(watched_settings.output_dir)
        _rows = log_tail.poll()
        # One image per process per step: the notebook keeps the trainer's batch size 1, no accumulation.
        _p = runs.progress(_rows, watched_settings.steps, images_per_step=watched_settings.num_processes)
        _rounds = runs.find_previews(_out)
        _steps = tuple(r.step for r in _rounds)
        if _steps != get_preview_steps():
            set_preview_steps(_steps)
        _loras = tuple(runs.find_loras(_out))
        if _loras != get_loras():
            set_loras(_loras)
        _status = watched_job.describe() if watched_job else "no run started from this page"
        _stats = mo.hstack([
            mo.stat(f"{_p.step} / {_p.max_steps}", label="step"),
            mo.stat(f"{_p.loss:.4f}" if _p.loss is not None else "-", label="loss"),
            mo.stat(f"{_p.images_per_s:.2f}" if _p.images_per_s else "-", label="images / s"),
            mo.stat(runs.format_duration(_p.eta_s) if _p.eta_s is not None else "-", label="ETA"),
        ], justify="start", gap=2)
        _gallery = (
            mo.vstack([
                mo.md(f"Latest previews: **step {_rounds[-1].step}**"),
                mo.hstack([mo.image(runs.image_thumbnail(path), width=192) for path in _rounds[-1].images],
                          justify="start", wrap=True),
            ])
            if _rounds else mo.md("No previews yet.")
        )
        _console = runs.tail_text(watched_job.log_path) if watched_job else ""
        monitor = mo.vstack([
            mo.md(f"**Status:** {_status}" + (f"  \n**Note:** {get_notice()}" if get_notice() else "")),
            mo.Html(f'<progress value="{_p.fraction:.4f}" max="1" style="width:100%"></progress>'),
            _stats,
            mo.Html(f'<div class="loss-chart-box">{runs.loss_chart_svg(_rows)}</div>'),
            _gallery,
            mo.accordion({"Console": mo.plain_text(_console or "(no output yet)")}),
        ])
    monitor
    return (monitor,)


@app.cell
def _(get_preview_steps, mo):
    _steps = [str(step) for step in get_preview_steps()]
    compare_input = mo.ui.multiselect(_steps, value=_steps[:1] + _steps[-3:] if len(_steps) > 4 else _steps,
                                      label="Preview steps to compare")
    mo.vstack([mo.md("## 5. Compare previews"), compare_input])
    return (compare_input,)


@app.cell
def _(compare_input, mo, runs, watched_settings):
    _chosen = {int(step) for step in compare_input.value}
    _rounds = [r for r in runs.find_previews(runs.resolve(watched_settings.output_dir)) if r.step in _chosen] \
        if watched_settings else []
    mo.hstack(
        [mo.vstack([mo.md(f"**step {r.step}**")] + [mo.image(runs.image_thumbnail(p), width=160) for p in r.images])
         for r in _rounds],
        justify="start",
    ) if _rounds else mo.md("Previews appear here once the trainer has drawn some.")


@app.cell
def _(get_loras, mo, prompts_input, watched_settings):
    _labels = [label for label, _ in get_loras()]
    render_loras_input = mo.ui.multiselect(_labels, value=_labels[-1:], label="LoRAs to render")
    render_base_input = mo.ui.checkbox(value=True, label="also the base model")
    render_prompts_input = mo.ui.text_area(value=prompts_input.value, label="Prompts (one a line)",
                                           full_width=True, rows=3)
    _size = watched_settings.preview_size if watched_settings else 1024
    render_size_input = mo.ui.number(start=64, step=16, value=_size, label="Size (px)")
    # FLUX.1-dev's usual 28 steps for real sizes; the tiny model at small sizes needs no more than 8.
    render_steps_input = mo.ui.number(start=1, step=1, value=28 if _size >= 512 else 8, label="Denoising steps")
    mo.vstack([
        mo.md("## 6. Render with sample.py"),
        mo.hstack([render_loras_input, render_base_input], justify="start", align="end"),
        render_prompts_input,
        mo.hstack([render_size_input, render_steps_input], justify="start"),
    ])
    return (render_base_input, render_loras_input, render_prompts_input, render_size_input,
            render_steps_input)


@app.cell
def _(get_loras, get_render, mo, render_base_input, render_loras_input, render_prompts_input, render_size_input,
      render_steps_input, runs, set_notice, set_render, watched_settings):
    def _render(_):
        _current = get_render()
        if _current is not None and _current[1].state == "running":
            return
        if watched_settings is None:
            set_notice("Fix the settings first.")
            return
        _paths = dict(get_loras())
        _chosen = [(label, str(_paths[label])) for label in render_loras_input.value if label in _paths]
        if render_base_input.value:
            _chosen.insert(0, ("base", None))
        _prompts = runs.parse_prompts(render_prompts_input.value)
        if not _chosen or not _prompts:
            set_notice("Pick at least one LoRA (or the base model) and one prompt to render.")
            return
        _folders = {label: str(runs.resolve(watched_settings.samples_dir) / label) for label, _ in _chosen}
        _steps = [runs.Step(f"sample.py {label}",
                            tuple(runs.sample_command(watched_settings, lora, _prompts, _folders[label],
                                                      size=int(render_size_input.value),
                                                      steps=int(render_steps_input.value))))
                  for label, lora in _chosen]
        _log = runs.resolve(watched_settings.run_dir) / "notebook-sample.log"
        set_render((_folders, runs.Job(_steps, _log).start()))

    def _stop_render(_):
        _current = get_render()
        if _current is not None:
            _current[1].stop()

    render_button = mo.ui.button(label="Render", kind="success", on_click=_render)
    stop_render_button = mo.ui.button(label="Stop rendering", kind="danger", on_click=_stop_render)
    mo.hstack([render_button, stop_render_button], justify="start")
    return render_button, stop_render_button


@app.cell
def _(get_render, mo, refresh, runs):
    refresh.value  # re-run on every tick while sample.py works
    _render = get_render()
    if _render is None:
        renders = mo.md("Rendered samples appear here, one column per model, same seeds.")
    else:
        _folders, _job = _render
        _columns = []
        for _label, _folder in _folders.items():
            _rows = runs.read_sample_index(_folder)
            _columns.append(mo.vstack(
                [mo.md(f"**{_label}**")]
                + ([mo.image(runs.image_thumbnail(row["file"]), width=192, caption=row["prompt"]) for row in _rows]
                   or [mo.md("(rendering...)" if _job.state == "running" else "(nothing)")])
            ))
        renders = mo.vstack([
            mo.md(f"**sample.py:** {_job.describe()}"),
            mo.hstack(_columns, justify="start"),
            mo.accordion({"Console": mo.plain_text(runs.tail_text(_job.log_path) or "(no output yet)")}),
        ])
    renders
    return (renders,)


if __name__ == "__main__":
    app.run()
