-- An apostrophe after a digit ("BM25's") for typst: pandoc's typst writer turns the typographic
-- apostrophe back into ', which typst sets as a prime after a digit (BM25′s). Emitting that one
-- character raw keeps it an apostrophe. Used by Quarto (_quarto.yml) and by the preview.
local APOSTROPHE = "\u{2019}"

function Str(el)
  if not FORMAT:match("typst") then
    return nil
  end
  local text = el.text
  local pattern = "%d" .. APOSTROPHE
  if not text:find(pattern) then
    return nil
  end
  local out, pos = {}, 1
  while true do
    local i, j = text:find(pattern, pos)
    if not i then
      break
    end
    table.insert(out, pandoc.Str(text:sub(pos, i)))
    table.insert(out, pandoc.RawInline("typst", APOSTROPHE))
    pos = j + 1
  end
  if pos <= #text then
    table.insert(out, pandoc.Str(text:sub(pos)))
  end
  return out
end
