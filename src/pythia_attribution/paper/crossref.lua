--[[ Cross-references for the pandoc preview of a Quarto manuscript.

Quarto numbers figures (#fig-), tables (#tbl-) and sections (#sec-) and resolves @fig-x, @tbl-x
and @sec-x. Plain pandoc reads those references as citations. This filter, run before
--citeproc, numbers the labelled elements in document order and replaces each reference with a
link reading "Figure 3", "Table 2" or "Section 4.1". A reference to a label that does not exist
is reported as a warning, which --fail-if-warnings turns into a failed build.

HTML gets "Figure N: " in front of each caption; typst numbers captions itself, in the same order.
Relative image paths become root-relative for typst (the compiler runs with the paper as root).
]]

local numbers = {}
local counts = {fig = 0, tbl = 0}
local section = {}
local is_typst = FORMAT:match("typst") ~= nil
local kinds = {fig = "Figure", tbl = "Table", sec = "Section"}

local function prefix(id)
  return id:match("^(%a+)%-")
end

local function label_caption(el, kind, n)
  if is_typst then return el end
  local lead = pandoc.Inlines({pandoc.Strong(pandoc.Inlines(kinds[kind] .. " " .. n .. ":")), pandoc.Space()})
  local blocks = el.caption.long
  if #blocks == 0 then
    el.caption.long = pandoc.Blocks({pandoc.Plain(lead)})
  else
    blocks[1].content = lead .. blocks[1].content
  end
  return el
end

-- a figure labelled #fig-... or a table labelled #tbl-...: the next number of its kind
local function number_float(el, kind)
  if prefix(el.identifier) ~= kind then return nil end
  counts[kind] = counts[kind] + 1
  numbers[el.identifier] = {kind = kind, n = tostring(counts[kind])}
  return label_caption(el, kind, counts[kind])
end

local function number(doc)
  doc.blocks = doc.blocks:walk({
    traverse = "topdown",
    Header = function(h)
      if h.classes:includes("unnumbered") then return nil end
      section[h.level] = (section[h.level] or 0) + 1
      for l = h.level + 1, 9 do section[l] = nil end
      if prefix(h.identifier) == "sec" then
        local parts = {}
        for l = 1, h.level do parts[#parts + 1] = tostring(section[l] or 0) end
        numbers[h.identifier] = {kind = "sec", n = table.concat(parts, ".")}
      end
    end,
    Figure = function(f) return number_float(f, "fig") end,
    Table = function(t) return number_float(t, "tbl") end,
  })
  return doc
end

local function resolve(cite)
  local out = pandoc.Inlines({})
  for i, c in ipairs(cite.citations) do
    local kind = prefix(c.id)
    if not kinds[kind] then return nil end -- a bibliographic citation: leave it to citeproc
    local target = numbers[c.id]
    if not target then
      pandoc.log.warn("dangling cross-reference @" .. c.id .. " (no element has the id #" .. c.id .. ")")
      return pandoc.Inlines({pandoc.Strong(pandoc.Inlines("??" .. c.id))})
    end
    if i > 1 then out:insert(pandoc.Str(", ")) end
    out:insert(pandoc.Link(pandoc.Inlines(kinds[kind] .. " " .. target.n), "#" .. c.id))
  end
  return out
end

local function root_images(img)
  if is_typst and not img.src:match("^/") and not img.src:match("^%a+:") then
    img.src = "/" .. img.src
  end
  return img
end

return {
  {Pandoc = number},
  {Cite = resolve, Image = root_images},
}
