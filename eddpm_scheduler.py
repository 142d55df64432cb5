"""EDDPMScheduler for users of the diffusers API: `from eddpm_scheduler import EDDPMScheduler`.

The scheduler lives in eddpm/scheduler.py (see its docstring); this file only re-exports it.

    from eddpm_scheduler import EDDPMScheduler
    scheduler = EDDPMScheduler.from_pretrained(OUTPUT_DIR, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(..., scheduler=scheduler)
    image = pipe(prompt, num_inference_steps=scheduler.config.num_kept_steps).images[0]

`SchedulerMixin` is exported too: pipelines saved while the class lived in this file name
["eddpm_scheduler", "EDDPMScheduler"] in their model_index.json, and diffusers finds the loading method
by looking that base class's name up in the named module.
"""

from eddpm.scheduler import EDDPMScheduler, SchedulerMixin, spaced_positions

__all__ = ["EDDPMScheduler", "SchedulerMixin", "spaced_positions"]
