"""Networks: backbones (timm, aliases, weights), heads, the classifier network, which parts train,
and the layer summary."""
