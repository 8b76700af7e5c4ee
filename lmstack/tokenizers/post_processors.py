"""Post-processors of the tokenizer.json pipeline: the special tokens placed around one sequence or a pair.

``build_post_processor(spec)`` returns a PostProcessor whose ``apply(a, b)`` gives the final ids
and token-type ids. Supported: TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel (no ids of
its own), Sequence. Anything else raises TokenizerError naming it.
"""

from dataclasses import dataclass, field

from lmstack.errors import TokenizerError

# A template item: ("special", ids, type_id) or ("sequence", "A" | "B", type_id).
Item = tuple[str, object, int]


@dataclass
class PostProcessor:
    """Templates for one sequence and for a pair (None: no special tokens are added)."""

    single: list[Item] = field(default_factory=lambda: [("sequence", "A", 0)])
    pair: list[Item] = field(default_factory=lambda: [("sequence", "A", 0), ("sequence", "B", 1)])

    def apply(self, a: list[int], b: list[int] | None = None) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of sequence ``a`` (and ``b``) with the template's special tokens."""
        ids, types = [], []
        for kind, value, type_id in (self.single if b is None else self.pair):
            part = (a if value == "A" else b) if kind == "sequence" else value
            ids += part
            types += [type_id] * len(part)
        return ids, types



def build_post_processor(spec: dict | None) -> PostProcessor:
    """The PostProcessor ``spec`` (a tokenizer.json "post_processor" object) describes."""
    if spec is None:
        return PostProcessor()
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise TokenizerError(f"post_processor must be an object with a 'type', got {spec!r:.80}")
    kind = spec["type"]
    if kind == "ByteLevel":
        return PostProcessor()
    if kind == "TemplateProcessing":
        return _template(spec)
    if kind in ("BertProcessing", "RobertaProcessing"):
        (_, cls_id), (_, sep_id) = spec["cls"], spec["sep"]  # [token, id] pairs
        cls_, sep = [int(cls_id)], [int(sep_id)]
        second_sep = sep + sep if kind == "RobertaProcessing" else sep
        b_type = 1 if kind == "BertProcessing" else 0
        return PostProcessor(single=[("special", cls_, 0), ("sequence", "A", 0), ("special", sep, 0)],
                             pair=[("special", cls_, 0), ("sequence", "A", 0), ("special", second_sep, 0),
                                   ("sequence", "B", b_type), ("special", sep, b_type)])
    if kind == "Sequence":
        processors = [build_post_processor(p) for p in spec.get("processors") or []]
        templated = [p for p in processors if p != PostProcessor()]
        if len(templated) > 1:
            raise TokenizerError("post_processor Sequence with more than one template-adding processor is not "
                                 "supported")
        return templated[0] if templated else PostProcessor()
    raise TokenizerError(f"post_processor {kind!r} is not supported (supported: TemplateProcessing, "
                         "BertProcessing, RobertaProcessing, ByteLevel, Sequence)")


def _template(spec: dict) -> PostProcessor:
    specials = {name: [int(i) for i in token["ids"]] for name, token in (spec.get("special_tokens") or {}).items()}

    def items(template: list[dict]) -> list[Item]:
        out: list[Item] = []
        for item in template:
            if "Sequence" in item:
                out.append(("sequence", item["Sequence"]["id"], int(item["Sequence"].get("type_id", 0))))
            elif "SpecialToken" in item:
                name = item["SpecialToken"]["id"]
                if name not in specials:
                    raise TokenizerError(f"post_processor template names special token {name!r}, which "
                                         "special_tokens does not define")
                out.append(("special", specials[name], int(item["SpecialToken"].get("type_id", 0))))
            else:
                raise TokenizerError(f"post_processor template item {item!r:.60} is neither Sequence nor "
                                     "SpecialToken")
        return out

    return PostProcessor(single=items(spec["single"]), pair=items(spec.get("pair") or spec["single"]))
