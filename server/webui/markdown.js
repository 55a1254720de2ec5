"use strict";
// A small Markdown subset (paragraphs, fenced code with a copy button, inline code, bold,
// italic, headings, lists, http(s) links) rendered by building DOM nodes. Text only ever
// reaches the page as text nodes, so model or user text can never become HTML.
(function () {
  const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const INLINE = new RegExp(
    [
      /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code span
      /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: bold
      /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 4: bold
      /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 5: italic
      /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 6: italic
      /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 7, 8: link
    ].join("|"),
    "g",
  );

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function inline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      parent.append(text.slice(last, m.index)); // a string argument becomes a text node
      if (m[1]) parent.append(el("code", null, m[2]));
      else if (m[3] !== undefined || m[4] !== undefined) inline(parent.appendChild(el("strong")), m[3] ?? m[4]);
      else if (m[5] !== undefined || m[6] !== undefined) inline(parent.appendChild(el("em")), m[5] ?? m[6]);
      else parent.append(link(m[7], m[8], m[0]));
      last = m.index + m[0].length;
    }
    parent.append(text.slice(last));
    return parent;
  }

  function link(label, href, source) {
    let url = null;
    try {
      url = new URL(href); // relative and unparsable hrefs throw: shown as text
    } catch {
      return source;
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") return source;
    const a = el("a");
    a.href = url.href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    return inline(a, label);
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    const area = el("textarea", "offscreen");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok ? Promise.resolve() : Promise.reject(new Error("copy failed"));
  }

  function codeBlock(code, lang) {
    const box = el("div", "code");
    const bar = el("div", "code-bar");
    const copy = el("button", "copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => {
      const done = (label) => {
        copy.textContent = label;
        setTimeout(() => (copy.textContent = "Copy"), 1500);
      };
      copyText(code).then(() => done("Copied"), () => done("Copy failed"));
    });
    bar.append(el("span", "lang", lang || "code"), copy);
    const pre = el("pre");
    pre.append(el("code", null, code));
    box.append(bar, pre);
    return box;
  }

  function renderMarkdown(text) {
    const root = el("div", "md");
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let para = null; // lines of the open paragraph
    let list = null; // the open <ul> or <ol>
    const flush = () => {
      if (para) root.append(inline(el("p"), para.join("\n")));
      para = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      const heading = !fence && HEADING.exec(line);
      const item = !fence && !heading && ITEM.exec(line);
      if (fence || heading || item || !line.trim()) flush();
      if (!item && !(list && /^\s+\S/.test(line))) list = null;
      if (fence) {
        const code = [];
        const mark = fence[1];
        for (i++; i < lines.length && !lines[i].trim().startsWith(mark); i++) code.push(lines[i]);
        root.append(codeBlock(code.join("\n"), fence[2])); // an unclosed fence runs to the end
      } else if (heading) {
        root.append(inline(el("h" + Math.min(heading[1].length + 2, 6)), heading[2]));
      } else if (item) {
        const ordered = /\d/.test(item[1][0]);
        const tag = ordered ? "OL" : "UL";
        if (!list || list.tagName !== tag) {
          list = root.appendChild(el(tag.toLowerCase()));
          const start = parseInt(item[1], 10);
          if (ordered && start !== 1) list.start = start;
        }
        list.append(inline(el("li"), item[2]));
      } else if (list) {
        inline(list.lastChild, "\n" + line.trim()); // an indented line continues the item
      } else if (line.trim()) {
        (para = para || []).push(line);
      }
    }
    flush();
    return root;
  }

  window.renderMarkdown = renderMarkdown;
})();
