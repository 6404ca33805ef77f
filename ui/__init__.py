"""The app's front-end helpers, by concern; pages import this package as ``ui``.

* :mod:`ui.state`: the session-state keys (each declared once) and the current sample;
* :mod:`ui.launch`: which workspace the server loads (launch settings, bundles);
* :mod:`ui.widgets`: page header, prompt inputs, the method picker, the shared step slider;
* :mod:`ui.images`, :mod:`ui.grids`, :mod:`ui.figures`: what the pages draw;
* :mod:`ui.progress`: scores on screen, background jobs and their progress;
* :mod:`ui.exports`: downloads;
* :mod:`ui.counterfactual`: Explore's retrain-without-them panel and the precomputed showcase;
* :mod:`ui.labels`: display names read from the core's registries.

Nothing here does attribution math: the pages call the
:class:`~attribution.workspace.Workspace`, the only door to the core.
"""

from attribution.workspace import short_text

from . import state
from .counterfactual import (
    counterfactual_panel,
    showcase,
)
from .exports import (
    export_buttons,
    scores_csv,
    scores_npz,
)
from .figures import (
    STEP_AXIS,
    curve_steps,
    curves_figure,
    default_labels,
    class_share_figure,
    example_figure,
    group_influence_bars,
    heatmap_figure,
    parse_labels,
    predicted_class,
)
from .grids import (
    PANEL_TEXT,
    Influencers,
    Kind,
    flips_table,
    influencer_grid,
    influencer_grid_png,
    influencer_pair,
    influencer_panel,
    influencers,
    per_step_normalized,
    sign_flips,
    spearman_table,
    step_ranges,
    top_union,
)
from .images import (
    NEGATIVE_COLOR,
    NEUTRAL_COLOR,
    POSITIVE_COLOR,
    canvas_to_mask,
    data_uri,
    framed,
    img_tag,
    mask_overlay,
    png_bytes,
    sample_uint8,
    tensor_image,
    trajectory_images,
    upscale,
)
from .labels import (
    DTRAK_OUTPUTS,
    METHOD_BLURBS,
    METHOD_SHORT,
)
from .launch import (
    ALLOWED_ENV,
    BUNDLE_ENV,
    LAUNCH_ENV,
    THREADS_ENV,
    LaunchSettings,
    allowed_roots,
    bundle_from_dir,
    checked_path,
    configure_torch_threads,
    get_workspace,
    launch_settings,
)
from .progress import (
    BuildStatus,
    all_step_scores,
    background_scores,
    build_status,
    computed_steps,
    poll_builds,
    start_store_build,
    step_scores,
    steps_by_distance,
)
from .state import (
    current_recipe,
    current_sample,
    handle_upload,
    sample_label,
    set_seed_sample,
    set_upload_sample,
)
from .widgets import (
    available_methods,
    method_selector,
    page_header,
    prompt_inputs,
    sample_caption,
    sample_page,
    step_label,
    step_slider,
)

__all__ = [
    "class_share_figure",
    "group_influence_bars",
    "short_text",
    "state",
    "ALLOWED_ENV",
    "BUNDLE_ENV",
    "BuildStatus",
    "DTRAK_OUTPUTS",
    "Influencers",
    "Kind",
    "LAUNCH_ENV",
    "LaunchSettings",
    "METHOD_BLURBS",
    "METHOD_SHORT",
    "NEGATIVE_COLOR",
    "NEUTRAL_COLOR",
    "PANEL_TEXT",
    "POSITIVE_COLOR",
    "STEP_AXIS",
    "THREADS_ENV",
    "all_step_scores",
    "allowed_roots",
    "available_methods",
    "background_scores",
    "build_status",
    "bundle_from_dir",
    "canvas_to_mask",
    "checked_path",
    "computed_steps",
    "counterfactual_panel",
    "configure_torch_threads",
    "current_recipe",
    "current_sample",
    "curve_steps",
    "curves_figure",
    "data_uri",
    "default_labels",
    "example_figure",
    "export_buttons",
    "flips_table",
    "framed",
    "get_workspace",
    "handle_upload",
    "heatmap_figure",
    "img_tag",
    "influencer_grid",
    "influencer_grid_png",
    "influencer_pair",
    "influencer_panel",
    "influencers",
    "launch_settings",
    "mask_overlay",
    "method_selector",
    "page_header",
    "parse_labels",
    "per_step_normalized",
    "png_bytes",
    "poll_builds",
    "predicted_class",
    "prompt_inputs",
    "sample_caption",
    "sample_label",
    "sample_page",
    "sample_uint8",
    "scores_csv",
    "scores_npz",
    "set_seed_sample",
    "set_upload_sample",
    "showcase",
    "sign_flips",
    "spearman_table",
    "start_store_build",
    "step_label",
    "step_ranges",
    "step_scores",
    "step_slider",
    "steps_by_distance",
    "tensor_image",
    "top_union",
    "trajectory_images",
    "upscale",
]
