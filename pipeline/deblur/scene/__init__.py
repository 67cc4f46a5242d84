"""Scene jobs: DeblurGS (Oh et al., arXiv 2404.11358), a sharp 3D Gaussian scene and each
view's camera motion recovered together from several blurry views of one static scene.

Modules: ``se3`` (poses), ``gaussians`` (the scene and its .ply), ``raster`` (our PyTorch
rasteriser; gsplat on CUDA), ``readers`` (transforms.json, COLMAP text), ``optimise`` (the
blur-aware fit with Gaussian Densification Annealing), ``job`` (a scene as one shard).
"""
