from .boxes import batched_nms, box_area

__all__ = ["batched_nms", "box_area"]
