"""The test oracle: stock PyTorch layers (batch_norm / instance_norm + activation), evaluated
with autograd in float64."""
import torch.nn.functional as F


def stock_act(z, activation, param):
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "elu":
        return F.elu(z, param)
    return z


def stock_norm_act(x, weight, bias, running_mean, running_var, use_batch_stats, per_sample,
                   momentum, eps, activation, param):
    """Stock forward; running statistics (when given) are updated in place like the stock
    layers do."""
    w = weight
    if per_sample:
        z = F.instance_norm(x, running_mean, running_var, w, bias, use_batch_stats, momentum, eps)
    else:
        z = F.batch_norm(x, running_mean, running_var, w, bias, use_batch_stats, momentum, eps)
    return stock_act(z, activation, param)
