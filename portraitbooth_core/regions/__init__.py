"""Several subjects in one image.

  layout          `layout`, `Box`, `Layout`, `fit_mask`, `side_by_side`, `RegionError`:
                  each region's share of every latent pixel (shares never sum past 1)
  attention       `RegionalAttention`, `TokenGroup`, `extend_context`: one UNet pass, each
                  identity token confined to its region
  multidiffusion  `fuse`, `active_paths`: the paper's one path per region, fused by shares
"""
